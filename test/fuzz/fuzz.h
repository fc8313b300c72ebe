/* Fuzz targets: each defines LLVMFuzzerTestOneInput. Built with libFuzzer by `make fuzz`, and
 * with driver.c (corpus replay plus bounded deterministic mutations) in `make test`. */
#ifndef AIGW_TEST_FUZZ_H
#define AIGW_TEST_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
