/*
 * darknet-kfac glue: turns a [kfac] cfg section into K-FAC blocks for the
 * network's convolutional and connected layers, collects their factor
 * statistics from inside Darknet's CPU backward pass, runs the extra
 * sampled-Fisher backward pass, and replaces SGD for those layers in
 * update_network. The maths lives in the library (kfac.h); this file only
 * knows Darknet: its layer fields, its sign conventions (sem. 2: l.delta and
 * weight_updates hold minus the batch-summed gradient) and its schedule
 * (*net->seen, get_current_rate, subdivisions).
 *
 * Everything is allocated in kfac_setup_network_err(); the per-step hooks
 * only read and write buffers that exist already.
 */
#include "kfac_darknet.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>

#include "network.h"
#include "option_list.h"
#include "utils.h"
#include "blas.h"

/* ------------------------------------------------------------ messages */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void kfac_die(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "darknet-kfac: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(EXIT_FAILURE);
}

/* ------------------------------------------------------------ cfg lines */

/* Darknet's read_cfg drops line numbers; messages need them, so the cfg is
 * re-read here with the same normalisation (all whitespace removed). */
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

/* Line of `key` inside the first [kfac] section at or after line `from`
 * (so repeated keys map to successive lines); 0 if not found. */
static int kfac_key_line(const char *cfgfile, const char *key, int from)
{
    FILE *fp = fopen(cfgfile, "r");
    if (!fp) return 0;
    char buf[4096];
    int line = 0, in = 0, found = 0, sections = 0;
    size_t klen = strlen(key);
    while (read_line(fp, buf, sizeof buf)) {
        ++line;
        if (buf[0] == '[') {
            if (in) break;
            in = strcmp(buf, "[kfac]") == 0 && sections++ == 0;
            continue;
        }
        if (!in || line < from) continue;
        if (strncmp(buf, key, klen) == 0 && buf[klen] == '=') { found = line; break; }
    }
    fclose(fp);
    return found;
}

void kfac_error_second_section(const char *cfgfile)
{
    int first = kfac_cfg_section_line(cfgfile, "[kfac]", 0);
    int second = kfac_cfg_section_line(cfgfile, "[kfac]", 1);
    kfac_die("%s:%d: second [kfac] section (the first is at line %d); only one is allowed",
             cfgfile, second, first);
}

/* ------------------------------------------------------------ schedule */

long kfac_current_step(const network *net)
{
    size_t per = (size_t)net->batch * (size_t)net->subdivisions;
    if (!net->seen || *net->seen == 0 || per == 0) return 0;
    /* seen has already been advanced by this datum's batch */
    return (long)((*net->seen - 1) / per);
}

int kfac_is_stats_step(const network *net)
{
    const kfac_net_state *st = (const kfac_net_state *)net->kfac;
    if (!st) return 0;
    /* Until every block has an inverse (first step, also after a resume),
     * collect statistics whatever the schedule says. */
    if (!st->ready) return 1;
    return kfac_current_step(net) % st->cfg.cov_update_every == 0;
}

/* ------------------------------------------------------------ setup */

static const char *layer_name(LAYER_TYPE t)
{
    switch (t) {
    case CONVOLUTIONAL: return "conv";
    case CONNECTED: return "connected";
    default: return get_layer_string(t);
    }
}

static void free_state(kfac_net_state *st)
{
    if (!st) return;
    for (int i = 0; i < st->nlayers; ++i) {
        kfac_layer_state *ls = &st->layers[i];
        kfac_block_free(ls->block);
        free(ls->vel_w); free(ls->vel_b);
        free(ls->scratch_w); free(ls->scratch_b);
        free(ls->scratch2_w); free(ls->scratch2_b);
        kfac_darknet_ckpt_free(ls);
    }
    for (int i = 0; i < st->nsnap; ++i) free(st->snap[i].saved);
    free(st->snap);
    free(st->layers);
    free(st->refs);
    free(st);
}

void kfac_free_network(network *net)
{
    if (!net || !net->kfac) return;
    for (int i = 0; i < net->n; ++i) net->layers[i].kfac = 0;
    free_state((kfac_net_state *)net->kfac);
    net->kfac = 0;
}

static int in_skip(const kfac_config *c, int idx)
{
    for (int i = 0; i < c->nskip; ++i)
        if (c->skip[i] == idx) return 1;
    return 0;
}

static float *alloc_floats(size_t n, size_t *bytes)
{
    if (!n) return 0;
    *bytes += n * sizeof(float);
    return (float *)calloc(n, sizeof(float));
}

/* Adds one accumulator to the sampled pass's snapshot list. */
static int add_snap(kfac_net_state *st, int cap, float *live, size_t n)
{
    if (!live || !n) return 0;
    if (st->nsnap >= cap) return -1;
    kfac_snapshot *s = &st->snap[st->nsnap];
    s->saved = (float *)malloc(n * sizeof(float));
    if (!s->saved) return -1;
    s->live = live;
    s->n = n;
    st->bytes += n * sizeof(float);
    st->nsnap++;
    return 0;
}

/* Decides the effective estimation mode; returns a reason when the sampled
 * pass is not possible (NULL when it is) and sets st->softmax_index. */
static const char *sampled_unsupported(network *net, kfac_net_state *st)
{
    int out = net->n - 1;
    while (out >= 0 && net->layers[out].type == COST) --out;
    st->softmax_index = -1;
    if (out < 0 || net->layers[out].type != SOFTMAX)
        return "the network has no softmax output (yolo/region/detection/cost loss)";
    if (net->layers[out].softmax_tree)
        return "a hierarchical (tree) softmax output has no per-example categorical to sample";
    for (int i = 0; i < out; ++i) {
        LAYER_TYPE t = net->layers[i].type;
        if (t == RNN || t == GRU || t == LSTM || t == CRNN)
            return "recurrent layers cannot run a second backward pass";
    }
    st->softmax_index = out;
    return NULL;
}

static int setup_snapshots(network *net, kfac_net_state *st, char *err, size_t errlen)
{
    int cap = 3 * (st->softmax_index + 1);
    st->snap = (kfac_snapshot *)calloc((size_t)cap, sizeof(kfac_snapshot));
    if (!st->snap) { seterr(err, errlen, "out of memory"); return -1; }
    for (int i = 0; i <= st->softmax_index; ++i) {
        layer *l = &net->layers[i];
        size_t nw = 0, nb = 0, ns = 0;
        switch (l->type) {
        case CONVOLUTIONAL:
        case DECONVOLUTIONAL:
            nw = (size_t)l->nweights; nb = (size_t)l->n; ns = (size_t)l->n; break;
        case CONNECTED:
            nw = (size_t)l->inputs * (size_t)l->outputs; nb = ns = (size_t)l->outputs; break;
        case BATCHNORM:
            nb = ns = (size_t)l->out_c; break;
        case LOCAL:
            nw = (size_t)l->size * l->size * l->c * l->n * l->out_w * l->out_h;
            nb = (size_t)l->outputs; break;
        default:
            if (l->weight_updates || l->bias_updates || l->scale_updates) {
                seterr(err, errlen, "layer %d (%s) has gradient accumulators the sampled pass "
                       "cannot save", i, layer_name(l->type));
                return 1; /* not fatal: fall back to empirical */
            }
        }
        if (add_snap(st, cap, l->weight_updates, nw) ||
            add_snap(st, cap, l->bias_updates, nb) ||
            add_snap(st, cap, l->scale_updates, ns)) {
            seterr(err, errlen, "out of memory");
            return -1;
        }
    }
    return 0;
}

static void human_bytes(size_t b, char *out, size_t len)
{
    if (b >= (size_t)1 << 20) snprintf(out, len, "%.1f MB", b / 1048576.0);
    else if (b >= 1024) snprintf(out, len, "%.1f KB", b / 1024.0);
    else snprintf(out, len, "%zu B", b);
}

/* The [kfac] max_factor_dim policy (default 8192 in kfac_config_default). A
 * block costs about 28*(kb^2 + n_g^2) bytes (float statistics, double
 * factor, staged double inverse, live float inverse) and one inverse about
 * kb^3 + n_g^3 flops: at 8192, at most ~1.9 GB and ~10 s of inverse on two
 * cores for one layer. In upstream
 * Darknet's cfg/ every factor is either <= 4609 (3x3x512 + bias: all of
 * darknet19/53, resnet/resnext, densenet, vgg-16 convs, yolov3) or >= 9216
 * (3x3x1024 in yolov2/yolov1, alexnet fc6 9217, strided fc 16385, vgg-16 fc6
 * 25089, extraction22k's 21842 classes), so any value in between gives the
 * same split. The largest zoo networks allocate 18-26 GB of K-FAC state,
 * most of it the per-block eigen-fallback workspace that stays untouched
 * (not resident) unless a Cholesky fails (docs/zoo.md). */
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

/* The memory policy: a layer with a factor larger than max_factor_dim (0: no
 * limit) stays on Darknet's SGD. */
static int over_max_factor_dim(const layer *l, int max_factor_dim)
{
    int kb, ng;
    factor_dims(l, &kb, &ng);
    return max_factor_dim > 0 && (kb > max_factor_dim || ng > max_factor_dim);
}

int kfac_setup_network_err(network *net, list *options, const char *cfgfile,
                           char *err, size_t errlen)
{
    char msg[512];
    int hdr = kfac_cfg_section_line(cfgfile, "[kfac]", 0);
    net->kfac = 0;

    kfac_net_state *st = (kfac_net_state *)calloc(1, sizeof *st);
    if (!st) { seterr(err, errlen, "%s: out of memory", cfgfile); return -1; }
    snprintf(st->cfgfile, sizeof st->cfgfile, "%s", cfgfile);
    kfac_config_default(&st->cfg);

    /* Keys in file order: a repeated key is reported rather than letting the
     * last one win silently. */
    int skip_line = hdr, from = hdr;
    for (node *n = options ? options->front : 0; n; n = n->next) {
        kvp *p = (kvp *)n->val;
        p->used = 1;
        int line = kfac_key_line(cfgfile, p->key, from);
        if (!line) line = kfac_key_line(cfgfile, p->key, 0);
        else from = line + 1;
        for (node *m = options->front; m != n; m = m->next) {
            if (strcmp(((kvp *)m->val)->key, p->key) == 0) {
                seterr(err, errlen, "%s:%d: [kfac] key '%s' given twice", cfgfile, line, p->key);
                goto fail;
            }
        }
        if (kfac_config_set(&st->cfg, p->key, p->val, msg, sizeof msg) != KFAC_OK) {
            /* the library's messages start with its own "kfac: " */
            const char *m = strncmp(msg, "kfac: ", 6) == 0 ? msg + 6 : msg;
            seterr(err, errlen, "%s:%d: [kfac] %s", cfgfile, line, m);
            goto fail;
        }
        if (strcmp(p->key, "skip") == 0) skip_line = line;
    }
    const char *why = kfac_config_check(&st->cfg);
    if (why) { seterr(err, errlen, "%s:%d: [kfac] %s", cfgfile, hdr, why); goto fail; }

#ifdef GPU
    if (net->gpu_index >= 0) {
        seterr(err, errlen, "%s:%d: [kfac] K-FAC runs on the CPU only, but this network is on "
               "GPU %d: run darknet with -nogpu (or build with GPU=0)", cfgfile, hdr, net->gpu_index);
        goto fail;
    }
#endif
    /* random=1 (multi-scale detector training) is supported: a conv block
     * follows its layer's size at capture time (kfac_conv_block_resize). */

    for (int i = 0; i < st->cfg.nskip; ++i) {
        int idx = st->cfg.skip[i];
        if (idx >= net->n) {
            seterr(err, errlen, "%s:%d: [kfac] skip: layer %d does not exist (layers are 0..%d)",
                   cfgfile, skip_line, idx, net->n - 1);
            goto fail;
        }
        LAYER_TYPE t = net->layers[idx].type;
        if (t != CONVOLUTIONAL && t != CONNECTED) {
            seterr(err, errlen, "%s:%d: [kfac] skip: layer %d is %s, not convolutional or "
                   "connected", cfgfile, skip_line, idx, layer_name(t));
            goto fail;
        }
    }

    st->momentum = st->cfg.momentum < 0 ? net->momentum : st->cfg.momentum;
    if (!(st->momentum >= 0 && st->momentum < 1)) {
        seterr(err, errlen, "%s:%d: [kfac] momentum %g (from [net]) must be in [0, 1)",
               cfgfile, hdr, st->momentum);
        goto fail;
    }

    /* Layers at or below a stopbackward layer never get a gradient. */
    int lowest_trained = 0;
    for (int i = 0; i < net->n; ++i)
        if (net->layers[i].stopbackward) lowest_trained = i + 1;

    st->layers = (kfac_layer_state *)calloc((size_t)net->n, sizeof(kfac_layer_state));
    st->refs = (kfac_layer_ref *)calloc((size_t)net->n, sizeof(kfac_layer_ref));
    if (!st->layers || !st->refs) { seterr(err, errlen, "%s: out of memory", cfgfile); goto fail; }

    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        if (l->type != CONVOLUTIONAL && l->type != CONNECTED) continue;
        if (in_skip(&st->cfg, i) || l->xnor || l->binary || i < lowest_trained) continue;
        if (l->learning_rate_scale == 0 || over_max_factor_dim(l, st->cfg.max_factor_dim)) continue;
        kfac_layer_state *ls = &st->layers[st->nlayers];
        ls->net = st;
        ls->index = i;
        kfac_status s;
        if (l->type == CONVOLUTIONAL) {
            kfac_conv_geom g;
            memset(&g, 0, sizeof g);
            g.c = l->c; g.h = l->h; g.w = l->w; g.n = l->n;
            g.size = l->size; g.stride = l->stride; g.pad = l->pad;
            g.dilation = 1; g.groups = l->groups;
            g.bias = !l->batch_normalize;
            /* Darknet itself reads the raw input for every 1x1 conv; the
             * pointwise block is exact only without stride or padding. */
            g.patches = (l->size == 1 && l->stride == 1 && l->pad == 0)
                            ? KFAC_PATCHES_POINTWISE : KFAC_PATCHES_IMAGE;
            ls->bias = g.bias;
            ls->nweights = l->nweights;
            ls->nbiases = l->n;
            s = kfac_conv_block_create(&g, &st->cfg, &ls->block);
        } else {
            ls->bias = !l->batch_normalize;
            ls->nweights = l->inputs * l->outputs;
            ls->nbiases = l->outputs;
            s = kfac_fc_block_create(l->inputs, l->outputs, ls->bias, &st->cfg, &ls->block);
        }
        if (s != KFAC_OK) {
            seterr(err, errlen, "%s: layer %d (%s): cannot create its K-FAC block: %s",
                   cfgfile, i, layer_name(l->type), kfac_status_str(s));
            goto fail;
        }
        st->nlayers++;
        kfac_capture_spec spec;
        if (kfac_block_info_get(ls->block, &ls->info) != KFAC_OK ||
            kfac_block_tensors_to_compute_grads(ls->block, &spec) != KFAC_OK ||
            spec.input_floats != (size_t)l->inputs || spec.output_grad_floats != (size_t)l->outputs ||
            ls->info.nparams != (size_t)ls->nweights + (ls->bias ? (size_t)ls->nbiases : 0)) {
            seterr(err, errlen, "%s: layer %d (%s): its K-FAC block does not match the layer's "
                   "shapes", cfgfile, i, layer_name(l->type));
            goto fail;
        }
        /* info again after register_inverse: its buffers count in the table */
        if ((s = kfac_block_instantiate_factors(ls->block, st->cfg.damping)) != KFAC_OK ||
            (s = kfac_block_register_inverse(ls->block)) != KFAC_OK ||
            (s = kfac_block_info_get(ls->block, &ls->info)) != KFAC_OK) {
            seterr(err, errlen, "%s: layer %d: K-FAC block setup failed: %s", cfgfile, i,
                   kfac_status_str(s));
            goto fail;
        }
        size_t bytes = 0;
        size_t nb = ls->bias ? (size_t)ls->nbiases : 0;
        ls->vel_w = alloc_floats((size_t)ls->nweights, &bytes);
        ls->scratch_w = alloc_floats((size_t)ls->nweights, &bytes);
        ls->scratch2_w = alloc_floats((size_t)ls->nweights, &bytes);
        ls->vel_b = alloc_floats(nb, &bytes);
        ls->scratch_b = alloc_floats(nb, &bytes);
        ls->scratch2_b = alloc_floats(nb, &bytes);
        if (!ls->vel_w || !ls->scratch_w || !ls->scratch2_w ||
            (nb && (!ls->vel_b || !ls->scratch_b || !ls->scratch2_b)) ||
            kfac_darknet_ckpt_alloc(ls, &bytes)) {
            seterr(err, errlen, "%s: out of memory", cfgfile);
            goto fail;
        }
        ls->bytes = bytes + ls->info.bytes;
        st->bytes += ls->bytes;
    }
    if (st->nlayers == 0) {
        seterr(err, errlen, "%s:%d: [kfac] no layer can use K-FAC: it needs a convolutional or "
               "connected layer that is not skipped, xnor/binary or below stopbackward",
               cfgfile, hdr);
        goto fail;
    }

    const char *fallback = 0;
    st->sampled = st->cfg.estimation_mode == KFAC_ESTIMATION_SAMPLED;
    if (st->sampled) {
        fallback = sampled_unsupported(net, st);
        if (!fallback) {
            int r = setup_snapshots(net, st, msg, sizeof msg);
            if (r < 0) { seterr(err, errlen, "%s: %s", cfgfile, msg); goto fail; }
            if (r > 0) fallback = "a layer's gradient accumulators cannot be saved";
        }
        if (fallback) st->sampled = 0;
    }

    /* Drawn from Darknet's rand() so that runs differ as they did when the
     * sampled pass called rand_uniform; a resume takes it from the sidecar. */
    st->seed = ((unsigned long long)(unsigned)rand() << 32) ^ (unsigned)rand();

    /* Only now is the state complete enough for the hooks to see it. */
    for (int k = 0; k < st->nlayers; ++k) net->layers[st->layers[k].index].kfac = &st->layers[k];
    net->kfac = st;

    /* start-up table */
    fprintf(stderr, "K-FAC (darknet-kfac) %s: estimation %s, damping %g (%s), cov_ema_decay %g, "
            "cov_update_every %d, cov_subsample %d, invert_every %d, norm_constraint %g "
            "(%s lr), momentum %g, precond_precision %s\n",
            cfgfile, st->sampled ? "sampled" : "empirical", st->cfg.damping,
            st->cfg.damping_type == KFAC_DAMPING_EXACT ? "exact" : "factored",
            st->cfg.cov_ema_decay, st->cfg.cov_update_every, st->cfg.cov_subsample,
            st->cfg.invert_every, st->cfg.norm_constraint,
            st->cfg.norm_constraint_lr == KFAC_CLIP_LR_BASE ? "base" : "current", st->momentum,
            st->cfg.precond_precision == KFAC_PRECISION_DOUBLE ? "double" : "float");
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
            char a[32], g[32], mem[32];
            snprintf(a, sizeof a, "%dx%d", ls->info.kb, ls->info.kb);
            snprintf(g, sizeof g, "%dx%d", ls->info.n_g, ls->info.n_g);
            human_bytes(ls->bytes, mem, sizeof mem);
            fprintf(stderr, "  %5d  %-10s %9s  %10s  %6d  %4s  %9s%s\n", i, layer_name(l->type),
                    a, g, ls->info.groups, ls->bias ? "yes" : "no", mem,
                    l->learning_rate_scale != 1 ? "  (per-layer learning_rate ignored)" : "");
        } else {
            int kb, ng;
            factor_dims(l, &kb, &ng);
            if (!in_skip(&st->cfg, i) && !l->xnor && !l->binary && i >= lowest_trained &&
                l->learning_rate_scale != 0) {
                fprintf(stderr, "  %5d  %-10s %9s  %10s  SGD (factor %d > max_factor_dim %d)\n",
                        i, layer_name(l->type), "", "", kb > ng ? kb : ng, st->cfg.max_factor_dim);
                continue;
            }
            const char *r = in_skip(&st->cfg, i) ? "skip"
                            : (l->xnor || l->binary) ? "xnor/binary"
                            : i < lowest_trained ? "below stopbackward"
                            : "frozen: learning_rate=0";
            fprintf(stderr, "  %5d  %-10s  SGD (%s)\n", i, layer_name(l->type), r);
        }
    }
    char mem[32];
    human_bytes(st->bytes, mem, sizeof mem);
    fprintf(stderr, "K-FAC: %d layer(s), %s in all; max_factor_dim %d%s\n", st->nlayers, mem,
            st->cfg.max_factor_dim, st->cfg.max_factor_dim ? " (larger layers: Darknet's SGD)" : " (no limit)");
    fprintf(stderr, "K-FAC: batch-norm scales/shifts keep Darknet's own SGD update\n");
    return 0;

fail:
    free_state(st);
    net->kfac = 0;
    return -1;
}

void kfac_setup_network(network *net, list *options, const char *cfgfile)
{
    char err[1024];
    if (kfac_setup_network_err(net, options, cfgfile, err, sizeof err))
        kfac_die("%s", err);
}

/* ------------------------------------------------------------ capture */

static void capture_failed(const kfac_layer_state *ls, const char *what, kfac_status s)
{
    kfac_die("layer %d: K-FAC could not accumulate %s: %s", ls->index, what, kfac_status_str(s));
}

static int kfac_stats_examples(const kfac_net_state *st, int batch)
{
    return (batch + st->cfg.cov_subsample - 1) / st->cfg.cov_subsample;
}

int kfac_wants_weight_grad_cpu(network net)
{
    const kfac_net_state *st = (const kfac_net_state *)net.kfac;
    return !st || !st->in_sampled_pass;
}

void kfac_capture_conv_cpu(layer l, network net, int i, int j,
                           const float *cols, const float *delta)
{
    kfac_layer_state *ls = (kfac_layer_state *)l.kfac;
    kfac_net_state *st = ls->net;
    if (!net.train || !kfac_is_stats_step(&net)) return;
    kfac_status s;
    if (l.out_h != ls->info.out_h || l.out_w != ls->info.out_w) {
        /* resize_network (random=1) happens between steps, so no statistics
         * are pending here; only T and the patch workspace change. */
        if ((s = kfac_conv_block_resize(ls->block, l.h, l.w)) != KFAC_OK ||
            (s = kfac_block_info_get(ls->block, &ls->info)) != KFAC_OK ||
            ls->info.out_h != l.out_h || ls->info.out_w != l.out_w)
            kfac_die("layer %d: its K-FAC block cannot follow the new size %dx%d: %s", ls->index,
                     l.w, l.h, kfac_status_str(s));
    }
    /* cov_subsample: the first ceil(batch/s) examples, a random subset
     * since mini-batches are drawn at random */
    if (i >= kfac_stats_examples(st, l.batch)) return;
    double t0 = what_time_is_it_now();
    /* The sampled pass reuses the same inputs, so A is taken once, from the
     * normal pass; G comes from whichever pass carries the Fisher targets. */
    if (!st->in_sampled_pass &&
        (s = kfac_block_accumulate_patches(ls->block, 0, j, cols)) != KFAC_OK)
        capture_failed(ls, "input patches", s);
    if ((st->in_sampled_pass || !st->sampled) &&
        (s = kfac_block_accumulate_output_grads_group(ls->block, 0, j, delta)) != KFAC_OK)
        capture_failed(ls, "output gradients", s);
    st->t_stats_acc += what_time_is_it_now() - t0;
}

void kfac_capture_connected_cpu(layer l, network net)
{
    kfac_layer_state *ls = (kfac_layer_state *)l.kfac;
    kfac_net_state *st = ls->net;
    if (!net.train || !kfac_is_stats_step(&net)) return;
    double t0 = what_time_is_it_now();
    kfac_status s;
    int rows = kfac_stats_examples(st, l.batch);
    if (!st->in_sampled_pass &&
        (s = kfac_block_accumulate_inputs(ls->block, 0, net.input, rows)) != KFAC_OK)
        capture_failed(ls, "inputs", s);
    if ((st->in_sampled_pass || !st->sampled) &&
        (s = kfac_block_accumulate_output_grads(ls->block, 0, l.delta, rows)) != KFAC_OK)
        capture_failed(ls, "output gradients", s);
    st->t_stats_acc += what_time_is_it_now() - t0;
}

/* ------------------------------------------------------------ sampled pass */

/* splitmix64's finaliser: the label draws are a pure function of (seed,
 * step, example, softmax group), so a resumed run draws what an
 * uninterrupted one would have, whatever else called rand() meanwhile. */
static unsigned long long mix64(unsigned long long x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

void kfac_backward_network_cpu(network *netp)
{
    kfac_net_state *st = (kfac_net_state *)netp->kfac;
    if (!st || !st->sampled || !netp->train || !kfac_is_stats_step(netp)) return;
    double t0 = what_time_is_it_now(), before = st->t_stats_acc;
    int i;

    /* The pass exists only for G: every accumulator the layers' backward
     * adds into is put back afterwards, bit for bit. */
    for (i = 0; i < st->nsnap; ++i)
        memcpy(st->snap[i].saved, st->snap[i].live, st->snap[i].n * sizeof(float));

    for (i = 0; i < netp->n; ++i) {
        layer *l = &netp->layers[i];
        if (l->delta) fill_cpu(l->outputs * l->batch, 0, l->delta, 1);
    }

    /* onehot(y) - p with y ~ Categorical(p), per example and softmax group:
     * Darknet's delta sign (truth - p), the gradient of that example's own
     * log-likelihood of a target drawn from the model. */
    layer sm = netp->layers[st->softmax_index];
    int groups = sm.groups > 0 ? sm.groups : 1;
    int gs = sm.inputs / groups;
    long step = kfac_current_step(netp);
    /* first example of this datum within its step (subdivisions) */
    unsigned long long ex0 = (unsigned long long)(*netp->seen - netp->batch) -
                             (unsigned long long)step * netp->batch * netp->subdivisions;
    unsigned long long key = mix64(st->seed ^ mix64((unsigned long long)step));
    for (int b = 0; b < sm.batch; ++b) {
        for (int g = 0; g < groups; ++g) {
            const float *p = sm.output + (size_t)b * sm.inputs + (size_t)g * gs;
            float *d = sm.delta + (size_t)b * sm.inputs + (size_t)g * gs;
            unsigned long long r = mix64(key ^ mix64((ex0 + b) * (unsigned long long)groups + g));
            float u = (float)(r >> 40) * (1.0f / 16777216.0f), cum = 0; /* [0, 1) */
            int y = gs - 1;
            for (int c = 0; c < gs; ++c) {
                cum += p[c];
                if (u < cum) { y = c; break; }
            }
            for (int c = 0; c < gs; ++c) d[c] = (c == y) - p[c];
        }
    }

    /* backward_network's loop, started at the softmax layer */
    st->in_sampled_pass = 1;
    network net = *netp;
    network orig = net;
    for (i = st->softmax_index; i >= 0; --i) {
        layer l = net.layers[i];
        if (l.stopbackward) break;
        if (i == 0) {
            net = orig;
        } else {
            layer prev = net.layers[i - 1];
            net.input = prev.output;
            net.delta = prev.delta;
        }
        net.index = i;
        l.backward(l, net);
    }
    st->in_sampled_pass = 0;

    for (i = 0; i < st->nsnap; ++i)
        memcpy(st->snap[i].live, st->snap[i].saved, st->snap[i].n * sizeof(float));
    /* the captures inside the pass timed themselves; count the pass once */
    st->t_stats_acc = before + (what_time_is_it_now() - t0);
}

/* ------------------------------------------------------------ update */

static int all_finite(const float *x, int n)
{
    for (int i = 0; i < n; ++i)
        if (!isfinite(x[i])) return 0;
    return 1;
}

void kfac_update_network_cpu(network *net, update_args a)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    if (!st) return;
    /* a caller that does not print progress still gets every line, late */
    if (st->pending_print) kfac_print_progress(net);

    long step = kfac_current_step(net);
    int stats = kfac_is_stats_step(net);
    int k, cov_failed = 0, inv_failed = 0, bn_failed = 0, first_bad = -1;
    kfac_status s;

    double t0 = what_time_is_it_now();
    if (stats) {
        for (k = 0; k < st->nlayers; ++k) {
            kfac_layer_state *ls = &st->layers[k];
            if ((s = kfac_block_update_cov(ls->block, st->cfg.cov_ema_decay)) != KFAC_OK) {
                ++cov_failed; ++ls->failures;
                if (first_bad < 0) first_bad = ls->index;
                fprintf(stderr, "K-FAC: layer %d: new statistics rejected (%s), keeping the "
                        "previous factors\n", ls->index, kfac_status_str(s));
            }
        }
    }
    double t1 = what_time_is_it_now();
    st->t_stats = st->t_stats_acc + (t1 - t0);
    st->t_stats_acc = 0;

    for (k = 0; k < st->nlayers; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        if (step % st->cfg.invert_every == 0 || st->steps_run == 0 ||
            !kfac_block_has_inverse(ls->block)) {
            if ((s = kfac_block_update_inverses(ls->block)) == KFAC_OK) {
                kfac_darknet_note_inverse(ls);
            } else {
                ++inv_failed; ++ls->failures;
                if (first_bad < 0) first_bad = ls->index;
                fprintf(stderr, "K-FAC: layer %d: inverse update failed (%s), %s\n", ls->index,
                        kfac_status_str(s), kfac_block_has_inverse(ls->block)
                        ? "keeping the last good inverse" : "the layer waits for one");
            }
        }
    }
    double t2 = what_time_is_it_now();
    st->t_inv = t2 - t1;

    /* A failed step changes no K-FAC weight (sem. 5): rejected statistics, a
     * failed inverse or a non-finite gradient in any K-FAC layer skips the
     * whole step, so no layer moves on a step another one rejected. The
     * gradients are dropped with it rather than carried into the next step.
     * (A non-finite Delta from a finite g is caught per layer by kfac_step.) */
    int bad_grad = -1;
    for (k = 0; k < st->nlayers && bad_grad < 0; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        layer *l = &net->layers[ls->index];
        if (!all_finite(l->weight_updates, ls->nweights) ||
            !all_finite(l->bias_updates, ls->nbiases) ||
            (l->scale_updates && !all_finite(l->scale_updates, ls->nbiases)))
            bad_grad = k;
    }
    int skip_step = cov_failed || inv_failed || bad_grad >= 0;
    if (skip_step) {
        if (bad_grad >= 0) {
            ++st->layers[bad_grad].failures;
            if (first_bad < 0) first_bad = st->layers[bad_grad].index;
        }
        for (k = 0; k < st->nlayers; ++k) {
            kfac_layer_state *ls = &st->layers[k];
            layer *l = &net->layers[ls->index];
            fill_cpu(ls->nweights, 0, l->weight_updates, 1);
            fill_cpu(ls->nbiases, 0, l->bias_updates, 1);
            if (l->scale_updates) fill_cpu(ls->nbiases, 0, l->scale_updates, 1);
        }
        char why[128];
        snprintf(why, sizeof why, "%s%s", cov_failed ? ", statistics rejected" : "",
                 inv_failed ? ", inverse failed" : "");
        if (bad_grad >= 0)
            snprintf(why + strlen(why), sizeof why - strlen(why),
                     ", non-finite gradient in layer %d", st->layers[bad_grad].index);
        fprintf(stderr, "K-FAC: step %ld skipped (%s): no K-FAC weight changed\n", step, why + 2);
    }

    for (k = 0; k < st->nlayers; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        layer *l = &net->layers[ls->index];
        kfac_layer_ref *r = &st->refs[k];
        r->block = ls->block;
        r->w = l->weights;
        r->grad_w = l->weight_updates;
        r->vel_w = ls->vel_w;
        r->scratch_w = ls->scratch_w;
        r->scratch2_w = ls->scratch2_w;
        if (ls->bias) {
            r->b = l->biases; r->grad_b = l->bias_updates; r->vel_b = ls->vel_b;
            r->scratch_b = ls->scratch_b; r->scratch2_b = ls->scratch2_b;
        } else {
            r->b = r->grad_b = r->vel_b = r->scratch_b = r->scratch2_b = 0;
        }
    }
    kfac_step_args args;
    args.learning_rate = a.learning_rate;
    args.momentum = st->momentum;
    args.decay = a.decay;
    args.batch = a.batch;
    args.norm_constraint = st->cfg.norm_constraint;
    if (st->cfg.norm_constraint_lr == KFAC_CLIP_LR_BASE && net->learning_rate > 0) {
        /* nu = min(1, sqrt(C / (eta_0^2 <g, Delta>))): the policy's decay
         * (steps, poly, burn_in, ...) then scales clipped steps too */
        double r = a.learning_rate / net->learning_rate;
        args.norm_constraint *= r * r;
    }
    kfac_step_report rep;
    memset(&rep, 0, sizeof rep);
    rep.first_skipped = -1;
    if (!skip_step && (s = kfac_step(st->refs, st->nlayers, &args, &rep)) != KFAC_OK)
        kfac_die("K-FAC step rejected its arguments: %s", kfac_status_str(s));
    if (rep.skipped > 0) {
        /* kfac_step names only the first skipped layer */
        int idx = rep.first_skipped >= 0 ? st->layers[rep.first_skipped].index : -1;
        if (rep.first_skipped >= 0) st->layers[rep.first_skipped].failures++;
        if (first_bad < 0) first_bad = idx;
        fprintf(stderr, "K-FAC: %d layer(s) skipped this step (first: layer %d): non-finite "
                "gradient/update or no inverse yet; their weights are unchanged\n",
                rep.skipped, idx);
    }

    /* Batch-norm scales and shifts are not in the block: Darknet's own SGD
     * lines (update_convolutional_layer / update_connected_layer). */
    for (k = 0; k < st->nlayers && !skip_step; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        layer *l = &net->layers[ls->index];
        if (ls->bias) continue;
        int n = ls->nbiases;
        float lr = a.learning_rate * l->learning_rate_scale;
        if (!all_finite(l->bias_updates, n) || (l->scale_updates && !all_finite(l->scale_updates, n))) {
            fill_cpu(n, 0, l->bias_updates, 1);
            if (l->scale_updates) fill_cpu(n, 0, l->scale_updates, 1);
            ++bn_failed; ++ls->failures;
            if (first_bad < 0) first_bad = ls->index;
            fprintf(stderr, "K-FAC: layer %d: non-finite batch-norm gradient, scales/shifts "
                    "unchanged\n", ls->index);
            continue;
        }
        axpy_cpu(n, lr / a.batch, l->bias_updates, 1, l->biases, 1);
        scal_cpu(n, a.momentum, l->bias_updates, 1);
        if (l->scales && l->scale_updates) {
            axpy_cpu(n, lr / a.batch, l->scale_updates, 1, l->scales, 1);
            scal_cpu(n, a.momentum, l->scale_updates, 1);
        }
    }
    st->t_precond = what_time_is_it_now() - t2;

    int failed = skip_step || bn_failed || rep.skipped > 0;
    st->consecutive_failures = failed ? st->consecutive_failures + 1 : 0;
    if (failed) st->total_failures++;
    st->last_step = step;
    st->last_nu = rep.nu;
    st->last_skipped = skip_step ? st->nlayers : rep.skipped;
    st->last_cov_failed = cov_failed;
    st->last_inv_failed = inv_failed;
    st->steps_run++;
    st->ready = 1;
    for (k = 0; k < st->nlayers; ++k)
        if (!kfac_block_has_inverse(st->layers[k].block)) st->ready = 0;
    st->pending_print = 1;

    if (st->consecutive_failures >= st->cfg.max_failures)
        kfac_die("%d consecutive K-FAC steps failed (max_failures=%d; last trouble in layer %d): "
                 "stopping before non-finite values reach the weights. Lower the learning rate "
                 "or raise damping in [kfac] of %s", st->consecutive_failures,
                 st->cfg.max_failures, first_bad, st->cfgfile);
}

void kfac_print_progress(network *net)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    if (!st || !st->pending_print) return;
    st->pending_print = 0;
    int retries = 0;
    for (int k = 0; k < st->nlayers; ++k) retries += kfac_block_num_retries(st->layers[k].block);
    printf("kfac %ld: damping %g, nu %.4g, skipped %d, failed steps %d in a row/%ld total",
           st->last_step, st->cfg.damping, st->last_nu, st->last_skipped,
           st->consecutive_failures, st->total_failures);
    if (retries) printf(", inverse retries %d", retries);
    printf("; seconds: stats %.3g, inverses %.3g, precond %.3g\n",
           st->t_stats, st->t_inv, st->t_precond);
}
