/*
 * `darknet kfac check <cfg>`: parses a cfg exactly as training would (so the
 * [kfac] section goes through the same setup, messages and exit status),
 * prints the start-up table and exits 0 only when K-FAC training could start.
 * Meant for checking a cfg before a long run, and for scripts and tests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "darknet.h"
#include "kfac_darknet.h"

static void kfac_usage(const char *prog)
{
    fprintf(stderr, "usage: %s kfac check <cfg>\n", prog);
}

void run_kfac(int argc, char **argv)
{
    if (argc < 4 || strcmp(argv[2], "check") != 0) {
        kfac_usage(argv[0]);
        exit(EXIT_FAILURE);
    }
    char *cfgfile = argv[3];
    FILE *fp = fopen(cfgfile, "r");
    if (!fp) {
        fprintf(stderr, "darknet-kfac: %s: cannot open the cfg file\n", cfgfile);
        exit(EXIT_FAILURE);
    }
    fclose(fp);
    /* the check describes CPU training, which is all K-FAC supports */
    gpu_index = -1;
    network *net = parse_network_cfg(cfgfile); /* exits 1 on a [kfac] error */
    if (!net->kfac) {
        fprintf(stderr, "darknet-kfac: %s: no [kfac] section: training would use Darknet's "
                "own optimizer\n", cfgfile);
        free_network(net);
        exit(EXIT_FAILURE);
    }
    printf("%s: K-FAC training can start\n", cfgfile);
#ifdef GPU
    /* K-FAC refuses GPU networks at setup; say so before a long run does */
    printf("%s: this is a GPU build: train with -nogpu (K-FAC runs on the CPU)\n", cfgfile);
#endif
    free_network(net);
}
