/*
 * Fixtures shared by the K-FAC tests: blocks under test with the factors the
 * test gave them, random batches of inputs and output gradients, the
 * caller-owned arrays of a kfac_step layer, and a temporary directory per
 * test. Everything asserts (cmocka) instead of returning errors, so a test
 * reads as the steps it takes.
 *
 * The Makefile links every .c file in tests/ but the test_ ones into every
 * test binary, the library tests and the Darknet ones alike: this file
 * depends on kfac.h, kfac_naive.h, cmocka and libc only. Arrays are allocated with
 * naive_alloc (calloc: zeroed) and freed with free(); the *_free functions
 * here release what the matching set-up allocated.
 */
#ifndef KFAC_TESTUTIL_H
#define KFAC_TESTUTIL_H

#include <stddef.h>

#include "kfac.h"
#include "kfac_naive.h"

/* ------------------------------------------------------------ blocks */

/* A conv geometry, all fields given. */
kfac_conv_geom tu_geom(int c, int h, int w, int n, int size, int stride, int pad, int dilation,
                       int groups, int bias, kfac_patches patches);

/* kfac_config_default with the damping type and precond_precision set. */
kfac_config tu_config(kfac_damping_type type, kfac_precision precision);

/* kfac_*_block_create that fails the test unless it succeeds (cfg may be NULL). */
kfac_block *tu_conv_block(const kfac_conv_geom *g, const kfac_config *cfg);
kfac_block *tu_fc_block(int inputs, int outputs, int bias, const kfac_config *cfg);

/* A block under test with its shape (from kfac_block_info) and the factors
 * the test gave it, for the dense references of kfac_naive.h. */
typedef struct {
    kfac_block *b;
    kfac_damping_type type;
    int groups, n_g, k, kb, T, bias, np;
    size_t nw, nbias; /* floats in w (groups*n_g*k) and in bias (n, 0 without) */
    double *A, *G;    /* groups consecutive kb*kb / n_g*n_g, zero at start */
} tu_block;

/* Takes ownership of b (created with damping `type`) and allocates A, G. */
void tu_block_wrap(tu_block *s, kfac_block *b, kfac_damping_type type);
/* Creates the block with cfg (NULL: defaults) and wraps it. */
void tu_block_conv(tu_block *s, const kfac_conv_geom *g, const kfac_config *cfg);
void tu_block_fc(tu_block *s, int inputs, int outputs, int bias, const kfac_config *cfg);
void tu_block_free(tu_block *s);

/* Group j's factors inside s->A / s->G. */
double *tu_block_A(const tu_block *s, int j);
double *tu_block_G(const tu_block *s, int j);

/* s->A/G of every group into the block (set_factors must succeed). */
void tu_block_set_factors(tu_block *s);
/* The block's factors of every group back into s->A/G. */
void tu_block_read_factors(tu_block *s);
/* Random SPD factors per group, drawn A_0, G_0, A_1, ... (naive_random_spd,
 * floor 0.3) with scales a_scale + j*a_step and g_scale + j*g_step, then
 * set into the block. */
void tu_block_random_factors(tu_block *s, naive_rng *r, double a_scale, double a_step,
                             double g_scale, double g_step);

/* instantiate_factors(lam), register_inverse and register_matpower of each
 * of the nexp exponents, all of which must succeed. */
void tu_block_register(tu_block *s, double lam, const double *exps, int nexp);
/* tu_block_register(s, lam, none), then update_inverses must succeed. */
void tu_block_invert(tu_block *s, double lam);

/* Dense damped block (naive_damped_block) from s->A/G: np x np, free(). */
double *tu_block_dense_damped(const tu_block *s, double lam);

/* (w, bias) <-> parameter vector with the block's shape (naive_pack). */
void tu_block_pack(const tu_block *s, const float *w, const float *bias, double *flat);
/* Fills w (nw floats), then bias (nbias floats, if any) with uniform values
 * in [-scale, scale) and packs them into flat (np doubles). */
void tu_block_fill_params(const tu_block *s, naive_rng *r, double scale, float *w, float *bias,
                          double *flat);

/* ------------------------------------------------------------ data */

/* M examples of conv inputs and output gradients, NCHW, with the
 * geometry's dimensions (naive_conv_dims). */
typedef struct {
    int M;
    int k, kb, n_g, T;     /* per group: weight columns, + bias; filters; locations */
    size_t x_each, d_each; /* floats per example: c*h*w and n*T */
    size_t x_len, d_len;   /* M*x_each, M*d_each */
    float *x, *d;
} tu_batch;

/* Allocates a batch of M examples for geometry g and, if r is not NULL,
 * fills it as tu_batch_fill does (zeros otherwise). */
void tu_batch_conv(tu_batch *bt, const kfac_conv_geom *g, int M, naive_rng *r, double x_scale,
                   double d_scale);
/* Fills x (scale x_scale), then d (scale d_scale), uniform in [-scale, scale). */
void tu_batch_fill(tu_batch *bt, naive_rng *r, double x_scale, double d_scale);
void tu_batch_free(tu_batch *bt);

/* accumulate_inputs and accumulate_output_grads of M examples on one tower,
 * both of which must succeed. */
void tu_feed(kfac_block *b, int tower, const float *x, const float *d, int M);
/* tu_feed on tower 0, then update_cov(decay): its status is returned. */
kfac_status tu_feed_update_cov(kfac_block *b, const float *x, const float *d, int M,
                               double decay);

/* ------------------------------------------------------------ kfac_step */

/* A kfac_layer_ref for s's block with every caller-owned array allocated
 * (zeroed) with the block's shape; the bias arrays are NULL without bias. */
void tu_layer_ref_alloc(kfac_layer_ref *ref, const tu_block *s);
void tu_layer_ref_free(kfac_layer_ref *ref);

/* ------------------------------------------------------------ temp files */

/* Creates a fresh directory /tmp/<prefix>_XXXXXX (mkdtemp) and makes it the
 * current one; returns its path. */
const char *tu_tmpdir_create(const char *prefix);
/* The current directory ("" when there is none). */
const char *tu_tmpdir(void);
/* "<current directory>/<name>". The result lives in one of 8 buffers used
 * in turn: copy it if it must outlive the next 7 calls. */
const char *tu_tmp_path(const char *name);
/* Removes the current directory and all below it (made writable first);
 * returns 0, or -1 if that failed. */
int tu_tmpdir_remove(void);
/* cmocka fixtures around one test: a fresh current directory, removed after
 * the test whether it passed or not. The prefix is the test's prestate
 * (cmocka_unit_test_prestate_setup_teardown), "kfac_test" when NULL. */
int tu_tmpdir_setup(void **state);
int tu_tmpdir_teardown(void **state);

/* 1 if something (anything: file, directory, link) is at path. */
int tu_exists(const char *path);
/* Whole file into a malloc'ed buffer (one spare byte; free()); *len = bytes. */
unsigned char *tu_read_file(const char *path, size_t *len);
/* Creates or truncates path with n bytes of p. */
void tu_write_file(const char *path, const void *p, size_t n);

/* Fails the test, printing both, unless needle occurs in hay. */
void tu_assert_contains(const char *hay, const char *needle);

#endif
