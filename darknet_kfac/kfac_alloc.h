/*
 * Allocation macros for the K-FAC library (internal).
 *
 * Every allocation of the library goes through these so that the unit tests,
 * which build the library with -DUNIT_TESTING, can route them to cmocka's
 * checked allocator and have leaks and double frees fail the test. cmocka.h is
 * deliberately not included: it drags in setjmp and its own macros, and the
 * three entry points are all we need.
 */
#ifndef KFAC_ALLOC_H
#define KFAC_ALLOC_H

#include <stddef.h>
#include <stdlib.h>

#ifdef UNIT_TESTING
extern void *_test_malloc(const size_t size, const char *file, const int line);
extern void *_test_calloc(const size_t number_of_elements, const size_t size,
                          const char *file, const int line);
extern void _test_free(void *const ptr, const char *file, const int line);
#define KFAC_MALLOC(sz)    _test_malloc((sz), __FILE__, __LINE__)
#define KFAC_CALLOC(n, sz) _test_calloc((n), (sz), __FILE__, __LINE__)
/* Older cmocka versions assert on NULL, free() does not: keep free()'s rule. */
#define KFAC_FREE(p)       do { if (p) _test_free((p), __FILE__, __LINE__); } while (0)
#else
#define KFAC_MALLOC(sz)    malloc(sz)
#define KFAC_CALLOC(n, sz) calloc((n), (sz))
#define KFAC_FREE(p)       free(p)
#endif

#endif /* KFAC_ALLOC_H */
