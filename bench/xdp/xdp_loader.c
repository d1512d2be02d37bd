// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Measurement only (bench/xdp): load xdp_bench.bpf.o, fill its maps for the
 * bench VM (MAC 52:54:00:12:34:56, 192.168.64.2; allowed 203.0.113.7/32 UDP
 * 51900), attach one program to IFNAME, print "ready", wait for SIGTERM/SIGINT,
 * then print the counters and detach.
 *
 *   xdp_loader OBJ MODE IFNAME POLICY
 *     MODE: xdp-drv | xdp-skb | tcx     POLICY: 0 anti-spoof only, 1 + allowlist
 * (This kernel has no kprobe PMU and refuses fentry, so which tun path ran is
 * shown by the TAP's rx_dropped: only tun_xdp_act(), i.e. native XDP in
 * tun_build_skb/tun_xdp_one, counts an XDP_DROP there.)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_link.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#define BPF_TCX_INGRESS_ 46 /* libbpf 1.1 predates tcx; the kernel has it */

static volatile sig_atomic_t stop;
static void on_sig(int s) { (void)s; stop = 1; }

struct src_val {
	unsigned char mac[6];
	unsigned short pad;
	unsigned int ifindex;
};
struct lpm_key {
	unsigned int prefixlen;
	unsigned int addr;
};

static int die(const char *what, int err)
{
	fprintf(stderr, "xdp_loader: %s: %s\n", what, strerror(err < 0 ? -err : err));
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s OBJ xdp-drv|xdp-skb|tcx IFNAME POLICY \n", argv[0]);
		return 2;
	}
	const char *mode = argv[2];
	int ifindex = if_nametoindex(argv[3]);
	int policy = atoi(argv[4]);
	if (!ifindex)
		return die("if_nametoindex", errno);

	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj)
		return die("open", errno);
	struct bpf_map *ro = bpf_object__find_map_by_name(obj, ".rodata");
	size_t sz = 0;
	unsigned int *rodata = ro ? (unsigned int *)bpf_map__initial_value(ro, &sz) : NULL;
	if (!rodata || sz < 4)
		return die("rodata", EINVAL);
	rodata[0] = policy; /* policy_on */
	struct bpf_program *p;
	bpf_object__for_each_program(p, obj) {
		const char *n = bpf_program__name(p);
		int want = !strcmp(n, !strcmp(mode, "tcx") ? "bench_tc" : "bench_xdp");
		bpf_program__set_autoload(p, want);
	}
	int err = bpf_object__load(obj);
	if (err)
		return die("load", err);

	struct src_val sv = { .mac = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 }, .ifindex = ifindex };
	unsigned int ip;
	inet_pton(AF_INET, "192.168.64.2", &ip);
	if (bpf_map_update_elem(bpf_object__find_map_fd_by_name(obj, "srcs"), &ip, &sv, 0))
		return die("srcs", errno);
	struct lpm_key k = { .prefixlen = 32 };
	inet_pton(AF_INET, "203.0.113.7", &k.addr);
	unsigned int port = 51900;
	if (bpf_map_update_elem(bpf_object__find_map_fd_by_name(obj, "allow"), &k, &port, 0))
		return die("allow", errno);

	int link_fd = -1, xdp_flags = 0;
	if (!strcmp(mode, "tcx")) {
		int fd = bpf_program__fd(bpf_object__find_program_by_name(obj, "bench_tc"));
		link_fd = bpf_link_create(fd, ifindex, BPF_TCX_INGRESS_, NULL);
		if (link_fd < 0)
			return die("bpf_link_create(tcx ingress)", errno);
	} else {
		int fd = bpf_program__fd(bpf_object__find_program_by_name(obj, "bench_xdp"));
		xdp_flags = XDP_FLAGS_UPDATE_IF_NOEXIST |
			    (!strcmp(mode, "xdp-drv") ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE);
		err = bpf_xdp_attach(ifindex, fd, xdp_flags, NULL);
		if (err)
			return die("bpf_xdp_attach", err);
	}
	signal(SIGTERM, on_sig);
	signal(SIGINT, on_sig);
	printf("ready\n");
	fflush(stdout);
	while (!stop)
		pause();

	int ncpu = libbpf_num_possible_cpus();
	unsigned long long tot[4] = { 0 }, vals[ncpu];
	int cfd = bpf_object__find_map_fd_by_name(obj, "cnt");
	for (unsigned int i = 0; i < 4; i++) {
		if (bpf_map_lookup_elem(cfd, &i, vals))
			continue;
		for (int c = 0; c < ncpu; c++)
			tot[i] += vals[c];
	}
	printf("pass=%llu drop_spoof=%llu drop_policy=%llu pass_other=%llu\n", tot[0], tot[1], tot[2],
	       tot[3]);
	if (link_fd >= 0)
		close(link_fd);
	else
		bpf_xdp_detach(ifindex, xdp_flags & ~XDP_FLAGS_UPDATE_IF_NOEXIST, NULL);
	bpf_object__close(obj);
	return 0;
}
