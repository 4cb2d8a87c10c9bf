/*
 * Darknet glue, setup: turns a [kfac] cfg section into the library's
 * optimizer context. The section's keys are parsed strictly with their cfg
 * line numbers (Darknet's reader drops those, so the file is read once more,
 * once), the layer policy decides which conv/connected layers get a block,
 * each such layer's weight and gradient arrays are handed to the context,
 * the sampled pass's accumulator snapshots are allocated, and the start-up
 * table is printed. Everything K-FAC needs per step is allocated here.
 */
#include "kfac_darknet_internal.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "option_list.h"

/* ------------------------------------------------------------ cfg lines */

/* Darknet's read_cfg keeps no line numbers; messages need them, so the cfg
 * is re-read with the same normalisation (all whitespace removed). */
static void strip_all(char *s)
{
    char *d = s;
    for (; *s; ++s)
        if (!isspace((unsigned char)*s)) *d++ = *s;
    *d = 0;
}

static int read_line(FILE *fp, char *buf, size_t len)
{
    if (!fgets(buf, (int)len, fp)) return 0;
    size_t n = strlen(buf);
    /* swallow the rest of an over-long line so line numbers stay right */
    if (n && buf[n - 1] != '\n') {
        int c;
        while ((c = fgetc(fp)) != EOF && c != '\n') {}
    }
    strip_all(buf);
    return 1;
}

int kfac_cfg_section_line(const char *cfgfile, const char *header, int occurrence)
{
    FILE *fp = fopen(cfgfile, "r");
    if (!fp) return 0;
    char buf[4096];
    int line = 0, seen = 0, found = 0;
    while (read_line(fp, buf, sizeof buf)) {
        ++line;
        if (strcmp(buf, header) == 0 && seen++ == occurrence) { found = line; break; }
    }
    fclose(fp);
    return found;
}

void kfac_error_second_section(const char *cfgfile)
{
    int first = kfac_cfg_section_line(cfgfile, "[kfac]", 0);
    int second = kfac_cfg_section_line(cfgfile, "[kfac]", 1);
    kfac_dn_die("%s:%d: second [kfac] section (the first is at line %d); only one is allowed",
                cfgfile, second, first);
}

/* The first [kfac] section's header line and key lines, in file order. */
typedef struct {
    int header;
    int n;
    struct { char key[256]; int line; } *keys;
} section_lines;

static int read_section_lines(const char *cfgfile, section_lines *sl)
{
    memset(sl, 0, sizeof *sl);
    FILE *fp = fopen(cfgfile, "r");
    if (!fp) return 0;
    char buf[4096];
    int line = 0, in = 0, cap = 0;
    while (read_line(fp, buf, sizeof buf)) {
        ++line;
        if (buf[0] == '[') {
            if (in) break;
            if (strcmp(buf, "[kfac]") == 0) { in = 1; sl->header = line; }
            continue;
        }
        char *eq = strchr(buf, '=');
        if (!in || !eq) continue;
        if (sl->n == cap) {
            cap = cap ? 2 * cap : 16;
            void *k = realloc(sl->keys, (size_t)cap * sizeof *sl->keys);
            if (!k) break;
            sl->keys = k;
        }
        *eq = 0;
        snprintf(sl->keys[sl->n].key, sizeof sl->keys[0].key, "%.255s", buf);
        sl->keys[sl->n++].line = line;
    }
    fclose(fp);
    return 0;
}

/* Line of the first `key` at or after line `from`; 0 if none. */
static int key_line(const section_lines *sl, const char *key, int from)
{
    for (int i = 0; i < sl->n; ++i)
        if (sl->keys[i].line >= from && strcmp(sl->keys[i].key, key) == 0)
            return sl->keys[i].line;
    return 0;
}

/* ------------------------------------------------------------ layer policy */

static int in_skip(const kfac_config *c, int idx)
{
    for (int i = 0; i < c->nskip; ++i)
        if (c->skip[i] == idx) return 1;
    return 0;
}

/* The dimensions of a layer's factors as its block would have them. */
static void factor_dims(const layer *l, int *kb, int *ng)
{
    if (l->type == CONVOLUTIONAL) {
        int groups = l->groups > 0 ? l->groups : 1;
        *kb = (l->c / groups) * l->size * l->size + !l->batch_normalize;
        *ng = l->n / groups;
    } else {
        *kb = l->inputs + !l->batch_normalize;
        *ng = l->outputs;
    }
}

/* Why layer i stays on Darknet's SGD, or NULL when it gets a block. The
 * max_factor_dim policy (default 8192): a block costs about
 * 28*(kb^2 + n_g^2) bytes and one inverse about kb^3 + n_g^3 flops, so at
 * 8192 at most ~1.9 GB and ~10 s of inverse on two cores for one layer.
 * In upstream Darknet's cfg/ every factor is either <= 4609 or >= 9216
 * (docs/zoo.md), so any value in between gives the same split. */
static const char *sgd_reason(const network *net, const kfac_config *c, int i,
                              int lowest_trained, char *buf, size_t len)
{
    const layer *l = &net->layers[i];
    if (l->type != CONVOLUTIONAL && l->type != CONNECTED) return "not conv/connected";
    if (in_skip(c, i)) return "skip";
    if (l->xnor || l->binary) return "xnor/binary";
    if (i < lowest_trained) return "below stopbackward";
    if (l->learning_rate_scale == 0) return "frozen: learning_rate=0";
    int kb, ng;
    factor_dims(l, &kb, &ng);
    if (c->max_factor_dim > 0 && (kb > c->max_factor_dim || ng > c->max_factor_dim)) {
        snprintf(buf, len, "factor %d > max_factor_dim %d", kb > ng ? kb : ng, c->max_factor_dim);
        return buf;
    }
    return NULL;
}

/* ------------------------------------------------------------ sampled pass set-up */

/* Decides the effective estimation mode; returns a reason when the sampled
 * pass is not possible (NULL when it is) and sets st->softmax_index. */
/* The output softmax (a cost layer may follow), or -1 with the reason. */
static int find_softmax(network *net, const char **why)
{
    int out = net->n - 1;
    while (out >= 0 && net->layers[out].type == COST) --out;
    *why = NULL;
    if (out < 0 || net->layers[out].type != SOFTMAX)
        *why = "the network has no softmax output (yolo/region/detection/cost loss)";
    else if (net->layers[out].softmax_tree)
        *why = "a hierarchical (tree) softmax output has no per-example categorical";
    for (int i = 0; i < out && !*why; ++i) {
        LAYER_TYPE t = net->layers[i].type;
        if (t == RNN || t == GRU || t == LSTM || t == CRNN)
            *why = "recurrent layers cannot run a second pass";
    }
    return *why ? -1 : out;
}

static const char *sampled_unsupported(network *net, kfac_net_state *st)
{
    const char *why;
    st->softmax_index = find_softmax(net, &why);
    return why;
}

typedef struct {
    kfac_net_state *st;
    kfac_snapshot *list;
    int *n;
    int cap, oom;
    const char *suffix;     /* arrays whose name ends so */
} snap_ctx;

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static void add_snap(void *vctx, const char *name, float *live, size_t n)
{
    snap_ctx *c = (snap_ctx *)vctx;
    if (c->oom || !ends_with(name, c->suffix)) return;
    if (*c->n >= c->cap) { c->oom = 1; return; }
    kfac_snapshot *s = &c->list[*c->n];
    s->saved = (float *)malloc(n * sizeof(float));
    if (!s->saved) { c->oom = 1; return; }
    s->live = live;
    s->n = n;
    c->st->snap_bytes += n * sizeof(float);
    ++*c->n;
}

/* 0, -1 out of memory, 1 a layer with accumulators the walk does not know
 * (not fatal: the empirical Fisher needs no snapshots) */
static int setup_snapshots(network *net, kfac_net_state *st, char *err, size_t errlen)
{
    /* the backward pass adds into the *_updates accumulators only */
    int cap = 3 * (st->softmax_index + 1);
    st->snap = (kfac_snapshot *)calloc((size_t)cap, sizeof(kfac_snapshot));
    snap_ctx c = { st, st->snap, &st->nsnap, cap, 0, "_updates" };
    if (!st->snap) { kfac_dn_seterr(err, errlen, "out of memory"); return -1; }
    for (int i = 0; i <= st->softmax_index; ++i) {
        layer *l = &net->layers[i];
        size_t nw, nb;
        kfac_dn_param_sizes(l, &nw, &nb);
        if (!nw && !nb && (l->weight_updates || l->bias_updates || l->scale_updates)) {
            kfac_dn_seterr(err, errlen, "layer %d (%s) has gradient accumulators the sampled "
                           "pass cannot save", i, kfac_dn_layer_name(l->type));
            return 1;
        }
        kfac_dn_walk_accums(l, add_snap, &c);
        if (c.oom) { kfac_dn_seterr(err, errlen, "out of memory"); return -1; }
    }
    return 0;
}

/* ------------------------------------------------------------ state */

/* A training-mode forward pass moves the rolling mean and variance of every
 * batch-normalised layer; the adaptation's extra pass puts them back. */
static int setup_eval_snapshots(network *net, kfac_net_state *st)
{
    int cap = 0;
    for (int i = 0; i < net->n; ++i) cap += 2 * (1 + 8); /* a layer and its sub-layers */
    st->eval_snap = (kfac_snapshot *)calloc((size_t)cap, sizeof(kfac_snapshot));
    if (!st->eval_snap) return -1;
    const char *sfx[2] = { "rolling_mean", "rolling_variance" };
    for (int k = 0; k < 2; ++k) {
        snap_ctx c = { st, st->eval_snap, &st->neval, cap, 0, sfx[k] };
        for (int i = 0; i < net->n && !c.oom; ++i) kfac_dn_walk_params(&net->layers[i], add_snap, &c);
        if (c.oom) return -1;
    }
    return 0;
}

static void free_state(kfac_net_state *st)
{
    if (!st) return;
    kfac_opt_free(st->opt);
    free(st->p0);
    free(st->curv_ctx);
    for (int i = 0; i < st->neval; ++i) free(st->eval_snap[i].saved);
    free(st->eval_snap);
    for (int i = 0; i < st->nsnap; ++i) free(st->snap[i].saved);
    free(st->snap);
    free(st->layers);
    free(st);
}

void kfac_free_network(network *net)
{
    if (!net || !net->kfac) return;
    for (int i = 0; i < net->n; ++i) net->layers[i].kfac = 0;
    free_state((kfac_net_state *)net->kfac);
    net->kfac = 0;
}

static void human_bytes(size_t b, char *out, size_t len)
{
    if (b >= (size_t)1 << 20) snprintf(out, len, "%.1f MB", b / 1048576.0);
    else if (b >= 1024) snprintf(out, len, "%.1f KB", b / 1024.0);
    else snprintf(out, len, "%zu B", b);
}

/* One K-FAC layer: its block in the context, its arrays handed over. */
static int add_layer(network *net, kfac_net_state *st, int i, char *err, size_t errlen)
{
    layer *l = &net->layers[i];
    kfac_layer_state *ls = &st->layers[st->nlayers];
    kfac_opt_layer d;
    kfac_conv_geom g;
    memset(&d, 0, sizeof d);
    memset(&g, 0, sizeof g);
    ls->net = st;
    ls->index = i;
    ls->bias = !l->batch_normalize;
    d.id = i;
    if (l->type == CONVOLUTIONAL) {
        g.c = l->c; g.h = l->h; g.w = l->w; g.n = l->n;
        g.size = l->size; g.stride = l->stride; g.pad = l->pad;
        g.dilation = 1; g.groups = l->groups;
        g.bias = ls->bias;
        /* Darknet itself reads the raw input for every 1x1 conv; the
         * pointwise block is exact only without stride or padding. */
        g.patches = (l->size == 1 && l->stride == 1 && l->pad == 0)
                        ? KFAC_PATCHES_POINTWISE : KFAC_PATCHES_IMAGE;
        d.geom = &g;
        ls->nweights = l->nweights;
        ls->nbiases = l->n;
    } else {
        d.inputs = l->inputs;
        d.outputs = l->outputs;
        d.bias = ls->bias;
        ls->nweights = l->inputs * l->outputs;
        ls->nbiases = l->outputs;
    }
    d.w = l->weights;
    d.grad_w = l->weight_updates;
    if (ls->bias) {
        d.b = l->biases;
        d.grad_b = l->bias_updates;
    } else {
        /* batch-norm shifts (and scales): Darknet's SGD moves them, but a
         * step the context skips must drop their gradients too */
        d.aux[d.naux++] = l->bias_updates;
    }
    if (l->scale_updates) d.aux[d.naux++] = l->scale_updates;
    d.aux_n = (size_t)ls->nbiases;
    kfac_status s = kfac_opt_add_layer(st->opt, &d, &ls->slot);
    if (s != KFAC_OK) {
        kfac_dn_seterr(err, errlen, "%s: layer %d (%s): cannot create its K-FAC block: %s",
                       st->cfgfile, i, kfac_dn_layer_name(l->type), kfac_status_str(s));
        return -1;
    }
    st->nlayers++;
    kfac_block_info info;
    kfac_capture_spec spec;
    kfac_block *b = kfac_opt_block(st->opt, ls->slot);
    if (kfac_block_info_get(b, &info) != KFAC_OK ||
        kfac_block_tensors_to_compute_grads(b, &spec) != KFAC_OK ||
        spec.input_floats != (size_t)l->inputs || spec.output_grad_floats != (size_t)l->outputs ||
        info.nparams != (size_t)ls->nweights + (ls->bias ? (size_t)ls->nbiases : 0)) {
        kfac_dn_seterr(err, errlen, "%s: layer %d (%s): its K-FAC block does not match the "
                       "layer's shapes", st->cfgfile, i, kfac_dn_layer_name(l->type));
        return -1;
    }
    return 0;
}

static void print_table(network *net, kfac_net_state *st, const char *fallback, int lowest_trained,
                        const char *curv_why)
{
    const kfac_config *c = kfac_opt_config(st->opt);
    kfac_opt_info oi;
    kfac_opt_info_get(st->opt, &oi);
    char step[96];
    if (c->step_size == KFAC_STEP_AUTO)
        snprintf(step, sizeof step, "step_size auto");
    else
        snprintf(step, sizeof step, "step_size policy (%s lr), momentum %g",
                 c->norm_constraint_lr == KFAC_CLIP_LR_BASE ? "base" : "current", oi.momentum);
    fprintf(stderr, "K-FAC (darknet-kfac) %s: estimation %s, damping %g (%s), cov_ema_decay %g, "
            "cov_update_every %d, cov_subsample %d, invert_every %d, norm_constraint %g, %s, "
            "precond_precision %s\n",
            st->cfgfile, st->sampled ? "sampled" : "empirical", oi.damping,
            c->damping_type == KFAC_DAMPING_EXACT ? "exact" : "factored",
            c->cov_ema_decay, c->cov_update_every, c->cov_subsample, c->invert_every,
            c->norm_constraint, step, c->precond_precision == KFAC_PRECISION_DOUBLE ? "double" : "float");
    if (c->step_size == KFAC_STEP_AUTO)
        fprintf(stderr, "K-FAC: adaptive: learning rate and momentum from the quadratic model "
                "each step with %s (scaled by the [net] policy's rate / its base rate%s)%s\n",
                st->curv_softmax >= 0 ? "the network's exact Gauss-Newton curvature (one "
                "forward pass per direction)" : "the blocks' Kronecker curvature",
                c->norm_constraint > 0 ? ", norm_constraint bounds u'Cu" : "",
                c->damping_adapt_every > 0 ? "" : "; damping fixed (damping_adapt_every=0)");
    else
        fprintf(stderr, "K-FAC: step_size=policy: the [net] learning rate and momentum %g, "
                "norm constraint; damping fixed\n", oi.momentum);
    if (c->step_size == KFAC_STEP_AUTO && c->curvature == KFAC_CURVATURE_EXACT &&
        st->curv_softmax < 0)
        fprintf(stderr, "K-FAC: curvature=exact is not possible here (%s): the quadratic model "
                "uses the blocks' curvature\n", curv_why ? curv_why : "?");
    if (c->step_size == KFAC_STEP_AUTO && c->damping_adapt_every > 0)
        fprintf(stderr, "K-FAC: adaptive: damping by Levenberg-Marquardt every %d steps "
                "(x%g when rho > 0.75, /%g when rho < 0.25, in [%g, %g]; one extra forward pass)\n",
                c->damping_adapt_every, c->damping_omega, c->damping_omega, c->min_damping,
                c->max_damping);
    if (fallback)
        fprintf(stderr, "K-FAC: estimation_mode=sampled is not possible here (%s): using the "
                "empirical Fisher (data labels) instead\n", fallback);
    fprintf(stderr, "  layer  type        A factor    G factor  groups  bias     memory\n");
    int k = 0;
    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        if (l->type != CONVOLUTIONAL && l->type != CONNECTED) continue;
        if (k < st->nlayers && st->layers[k].index == i) {
            kfac_layer_state *ls = &st->layers[k++];
            kfac_block_info info;
            kfac_block_info_get(kfac_opt_block(st->opt, ls->slot), &info);
            char a[32], g[32], mem[32];
            snprintf(a, sizeof a, "%dx%d", info.kb, info.kb);
            snprintf(g, sizeof g, "%dx%d", info.n_g, info.n_g);
            human_bytes(kfac_opt_layer_bytes(st->opt, ls->slot), mem, sizeof mem);
            fprintf(stderr, "  %5d  %-10s %9s  %10s  %6d  %4s  %9s%s\n", i,
                    kfac_dn_layer_name(l->type), a, g, info.groups, ls->bias ? "yes" : "no", mem,
                    l->learning_rate_scale != 1 ? "  (per-layer learning_rate ignored)" : "");
        } else {
            char buf[96];
            const char *r = sgd_reason(net, c, i, lowest_trained, buf, sizeof buf);
            fprintf(stderr, "  %5d  %-10s  SGD (%s)\n", i, kfac_dn_layer_name(l->type), r);
        }
    }
    char mem[32];
    human_bytes(oi.bytes + st->snap_bytes, mem, sizeof mem);
    fprintf(stderr, "K-FAC: %d layer(s), %s in all; max_factor_dim %d%s\n", st->nlayers, mem,
            c->max_factor_dim, c->max_factor_dim ? " (larger layers: Darknet's SGD)" : " (no limit)");
    fprintf(stderr, "K-FAC: batch-norm scales/shifts keep Darknet's own SGD update\n");
}

/* ------------------------------------------------------------ setup */

int kfac_setup_network_err(network *net, list *options, const char *cfgfile,
                           char *err, size_t errlen)
{
    char msg[512];
    section_lines sl;
    read_section_lines(cfgfile, &sl);
    int hdr = sl.header;
    net->kfac = 0;

    kfac_net_state *st = (kfac_net_state *)calloc(1, sizeof *st);
    if (!st) { kfac_dn_seterr(err, errlen, "%s: out of memory", cfgfile); free(sl.keys); return -1; }
    snprintf(st->cfgfile, sizeof st->cfgfile, "%s", cfgfile);
    kfac_config cfg;
    kfac_config_default(&cfg);

    /* Keys in file order: a repeated key is reported rather than letting the
     * last one win silently. */
    int skip_line = hdr, from = hdr;
    for (node *n = options ? options->front : 0; n; n = n->next) {
        kvp *p = (kvp *)n->val;
        p->used = 1;
        int line = key_line(&sl, p->key, from);
        if (!line) line = key_line(&sl, p->key, 0);
        else from = line + 1;
        for (node *m = options->front; m != n; m = m->next) {
            if (strcmp(((kvp *)m->val)->key, p->key) == 0) {
                kfac_dn_seterr(err, errlen, "%s:%d: [kfac] key '%s' given twice", cfgfile, line,
                               p->key);
                goto fail;
            }
        }
        if (kfac_config_set(&cfg, p->key, p->val, msg, sizeof msg) != KFAC_OK) {
            /* the library's messages start with its own "kfac: " */
            const char *m = strncmp(msg, "kfac: ", 6) == 0 ? msg + 6 : msg;
            kfac_dn_seterr(err, errlen, "%s:%d: [kfac] %s", cfgfile, line, m);
            goto fail;
        }
        if (strcmp(p->key, "skip") == 0) skip_line = line;
    }

    /* the one validation of the settings, with the effective momentum */
    if (kfac_opt_create(&cfg, net->momentum, net->n, &st->opt, msg, sizeof msg) != KFAC_OK) {
        kfac_dn_seterr(err, errlen, "%s:%d: [kfac] %s", cfgfile, hdr, msg);
        goto fail;
    }
#ifdef GPU
    if (net->gpu_index >= 0) {
        kfac_dn_seterr(err, errlen, "%s:%d: [kfac] K-FAC runs on the CPU only, but this network "
                       "is on GPU %d: run darknet with -nogpu (or build with GPU=0)", cfgfile, hdr,
                       net->gpu_index);
        goto fail;
    }
#endif
    /* random=1 (multi-scale detector training) is supported: a conv block
     * follows its layer's size at capture time (kfac_conv_block_resize). */

    for (int i = 0; i < cfg.nskip; ++i) {
        int idx = cfg.skip[i];
        if (idx >= net->n) {
            kfac_dn_seterr(err, errlen, "%s:%d: [kfac] skip: layer %d does not exist (layers are "
                           "0..%d)", cfgfile, skip_line, idx, net->n - 1);
            goto fail;
        }
        LAYER_TYPE t = net->layers[idx].type;
        if (t != CONVOLUTIONAL && t != CONNECTED) {
            kfac_dn_seterr(err, errlen, "%s:%d: [kfac] skip: layer %d is %s, not convolutional or "
                           "connected", cfgfile, skip_line, idx, kfac_dn_layer_name(t));
            goto fail;
        }
    }

    /* Layers at or below a stopbackward layer never get a gradient. */
    int lowest_trained = 0;
    for (int i = 0; i < net->n; ++i)
        if (net->layers[i].stopbackward) lowest_trained = i + 1;

    st->layers = (kfac_layer_state *)calloc((size_t)net->n, sizeof(kfac_layer_state));
    if (!st->layers) { kfac_dn_seterr(err, errlen, "%s: out of memory", cfgfile); goto fail; }
    for (int i = 0; i < net->n; ++i) {
        char buf[96];
        if (sgd_reason(net, &cfg, i, lowest_trained, buf, sizeof buf)) continue;
        if (add_layer(net, st, i, err, errlen)) goto fail;
    }
    if (st->nlayers == 0) {
        kfac_dn_seterr(err, errlen, "%s:%d: [kfac] no layer can use K-FAC: it needs a "
                       "convolutional or connected layer that is not skipped, xnor/binary or "
                       "below stopbackward", cfgfile, hdr);
        goto fail;
    }

    const char *fallback = 0;
    st->sampled = cfg.estimation_mode == KFAC_ESTIMATION_SAMPLED;
    if (st->sampled) {
        fallback = sampled_unsupported(net, st);
        if (!fallback) {
            int r = setup_snapshots(net, st, msg, sizeof msg);
            if (r < 0) { kfac_dn_seterr(err, errlen, "%s: %s", cfgfile, msg); goto fail; }
            if (r > 0) fallback = "a layer's gradient accumulators cannot be saved";
        }
        if (fallback) st->sampled = 0;
    }

    /* The extra forward passes: the damping adaptation's, and the exact
     * curvature's, which needs a softmax output and passes that repeat
     * (no dropout, whose masks change from pass to pass). */
    const char *curv_why = NULL;
    st->curv_softmax = -1;
    if (cfg.step_size == KFAC_STEP_AUTO && cfg.curvature == KFAC_CURVATURE_EXACT) {
        int sm = find_softmax(net, &curv_why);
        for (int i = 0; sm >= 0 && i < net->n && !curv_why; ++i)
            if (net->layers[i].type == DROPOUT)
                curv_why = "dropout layers make every forward pass different";
        if (!curv_why && (setup_eval_snapshots(net, st) || kfac_dn_setup_curvature(net, st, sm))) {
            kfac_dn_seterr(err, errlen, "%s: out of memory", cfgfile);
            goto fail;
        }
    }
    if (cfg.step_size == KFAC_STEP_AUTO && cfg.damping_adapt_every > 0 && !st->eval_snap &&
        setup_eval_snapshots(net, st)) {
        kfac_dn_seterr(err, errlen, "%s: out of memory", cfgfile);
        goto fail;
    }

    /* Drawn from Darknet's rand() so that runs differ as they did when the
     * sampled pass called rand_uniform; a resume takes it from the sidecar. */
    kfac_opt_set_seed(st->opt, ((unsigned long long)(unsigned)rand() << 32) ^ (unsigned)rand());

    /* Only now is the state complete enough for the hooks to see it. */
    for (int k = 0; k < st->nlayers; ++k) net->layers[st->layers[k].index].kfac = &st->layers[k];
    net->kfac = st;
    print_table(net, st, fallback, lowest_trained, curv_why);
    free(sl.keys);
    return 0;

fail:
    free(sl.keys);
    free_state(st);
    net->kfac = 0;
    return -1;
}

void kfac_setup_network(network *net, list *options, const char *cfgfile)
{
    char err[1024];
    if (kfac_setup_network_err(net, options, cfgfile, err, sizeof err))
        kfac_dn_die("%s", err);
}
