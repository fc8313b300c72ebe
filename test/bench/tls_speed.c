/* tls-speed: how fast this machine's mbedTLS seals TLS records with each AEAD cipher aigw may
 * offer, at the record sizes an LLM API sends (an SSE event, a JSON answer, a full record), to
 * pick the order of core/tls.c's cipher suite list. usage: tls-speed [MILLISECONDS per line] */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <mbedtls/cipher.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    static const mbedtls_cipher_type_t types[] = {
        MBEDTLS_CIPHER_CHACHA20_POLY1305,
        MBEDTLS_CIPHER_AES_128_GCM,
        MBEDTLS_CIPHER_AES_256_GCM,
    };
    static const size_t sizes[] = {200, 700, 4096, 16384};
    static unsigned char in[16384], out[16384 + 16], key[32], iv[12], ad[13];
    double per_line = (argc > 1 ? atof(argv[1]) : 300) / 1000;

    printf("%-20s %7s %12s %9s\n", "cipher", "record", "ns/record", "MB/s");
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
            const mbedtls_cipher_info_t *info = mbedtls_cipher_info_from_type(types[t]);
            mbedtls_cipher_context_t ctx;
            size_t olen, n = sizes[s];
            long iters = 0;
            double t0, dt;

            mbedtls_cipher_init(&ctx);
            if (!info || mbedtls_cipher_setup(&ctx, info) != 0 ||
                mbedtls_cipher_setkey(&ctx, key, (int)info->key_bitlen, MBEDTLS_ENCRYPT) != 0) {
                fprintf(stderr, "tls-speed: cipher %d not available\n", (int)types[t]);
                return 1;
            }
            /* Sealing and opening cost the same; the per-record nonce changes as in TLS. */
            t0 = now_s();
            do {
                for (int i = 0; i < 64; i++, iters++) {
                    iv[11] = (unsigned char)iters;
                    mbedtls_cipher_auth_encrypt_ext(&ctx, iv, sizeof(iv), ad, sizeof(ad), in, n,
                                                    out, sizeof(out), &olen, 16);
                }
                dt = now_s() - t0;
            } while (dt < per_line);
            printf("%-20s %7zu %12.0f %9.0f\n", info->name, n, dt / (double)iters * 1e9,
                   (double)n * (double)iters / dt / 1e6);
            mbedtls_cipher_free(&ctx);
        }
    }
    return 0;
}
