#!/bin/sh
# Test certificates for aigw-mock over HTTPS: gen-certs.sh DIR creates DIR/ca.crt, DIR/ca.key
# (a test CA), DIR/server.crt, DIR/server.key (signed by that CA, for localhost and 127.0.0.1)
# and DIR/other-ca.crt (an unrelated CA, for "wrong certificate is refused" tests).
# Idempotent: nothing is redone when all files are there. Quiet unless something fails.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
files="ca.crt ca.key server.crt server.key other-ca.crt"

all=yes
for f in $files; do
    [ -s "$dir/$f" ] || all=no
done
[ "$all" = yes ] && exit 0

command -v openssl >/dev/null 2>&1 || { echo "$0: openssl not found" >&2; exit 1; }
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.gen-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

log=$tmp/openssl.log
run() {
    if ! "$@" >>"$log" 2>&1; then
        echo "$0: failed: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

# EC P-256 keys: small, fast handshakes, understood by mbedTLS and OpenSSL clients.
newkey() {
    run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

newca() { # KEY CRT CN
    newkey "$1"
    run openssl req -new -x509 -key "$1" -out "$2" -days 3650 -sha256 -subj "/CN=$3" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
}

newca "$tmp/ca.key" "$tmp/ca.crt" "aigw test CA"
newca "$tmp/other-ca.key" "$tmp/other-ca.crt" "aigw unrelated test CA"

newkey "$tmp/server.key"
run openssl req -new -key "$tmp/server.key" -out "$tmp/server.csr" -subj "/CN=localhost"
cat >"$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
authorityKeyIdentifier=keyid
EXT
run openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
    -CAcreateserial -out "$tmp/server.crt" -days 3650 -sha256 -extfile "$tmp/server.ext"
run openssl verify -CAfile "$tmp/ca.crt" "$tmp/server.crt"

chmod 600 "$tmp/ca.key" "$tmp/server.key"
for f in $files; do
    mv -f "$tmp/$f" "$dir/$f"
done
