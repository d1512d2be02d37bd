// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Measurement only (bench/xdp): feed a TAP the way a VMM does (QEMU's
 * userspace virtio-net: IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, vnet header 12 bytes,
 * TUNSETSNDBUF INT_MAX, O_NONBLOCK, one write per frame) with pre-built
 * Ethernet/IPv4/UDP frames a VM is not allowed to send, as fast as it can for
 * SECONDS, pinned to CPU.
 *
 *   tap_writer IFNAME SECONDS CPU FRAME_BYTES spoof|deny VNET(0|1) [small-sndbuf]
 *     small-sndbuf: TUNSETSNDBUF 212992 (the usual wmem_default, what a TAP
 *     gets when its VMM never sets it) instead of INT_MAX: tun_get_user then
 *     allocates an skb first and a native XDP program runs via do_xdp_generic.
 *     (The TAP keeps the last value set, so set it every time.)
 *     spoof: VM MAC, source 10.66.0.9 (not the VM's), to 203.0.113.7:51900
 *     deny:  VM MAC and 192.168.64.2 (the VM's), to 198.51.100.9:53 (no rule)
 *
 * With sndbuf INT_MAX, O_NONBLOCK and a frame that fits a page, tun_get_user
 * takes tun_build_skb(), which runs a natively attached XDP program on an
 * xdp_buff before any skb exists. Everything the frame costs afterwards
 * (netif_receive_skb, tcx, the stack) runs in this process's write() (softirq
 * work is done under local_bh_disable in process context), so getrusage
 * covers it. Prints one line of key=value.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double tv(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

/* cpuN user nice system idle iowait irq softirq steal */
static int read_stat(unsigned long long v[2][8])
{
	FILE *f = fopen("/proc/stat", "r");
	char line[512];
	int n = 0;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f) && n < 2) {
		int cpu;
		unsigned long long a[8];
		if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &a[0], &a[1], &a[2],
			   &a[3], &a[4], &a[5], &a[6], &a[7]) == 9 &&
		    cpu < 2) {
			memcpy(v[cpu], a, sizeof a);
			n++;
		}
	}
	fclose(f);
	return 0;
}

static unsigned short csum(const void *p, int len)
{
	const unsigned short *w = p;
	unsigned long s = 0;
	for (; len > 1; len -= 2)
		s += *w++;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return ~s;
}

int main(int argc, char **argv)
{
	if (argc < 7) {
		fprintf(stderr, "usage: %s IFNAME SECONDS CPU FRAME_BYTES spoof|deny VNET\n", argv[0]);
		return 2;
	}
	const char *ifname = argv[1];
	double secs = atof(argv[2]);
	int cpu = atoi(argv[3]), flen = atoi(argv[4]), vnet = atoi(argv[6]);
	int deny = !strcmp(argv[5], "deny");
	if (flen < 60 || flen > 1514)
		return 2;

	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		perror("sched_setaffinity");

	int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
	if (fd < 0)
		return perror("/dev/net/tun"), 1;
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0);
	if (ioctl(fd, TUNSETIFF, &ifr))
		return perror("TUNSETIFF"), 1;
	int hdrsz = vnet ? 12 : 0; /* virtio 1.0 / mergeable rx buffers, as QEMU */
	if (vnet && ioctl(fd, TUNSETVNETHDRSZ, &hdrsz))
		return perror("TUNSETVNETHDRSZ"), 1;
	int sndbuf = INT_MAX, got = 0;
	if (argc > 7 && !strcmp(argv[7], "small-sndbuf"))
		sndbuf = 212992;
	if (ioctl(fd, TUNSETSNDBUF, &sndbuf))
		return perror("TUNSETSNDBUF"), 1;
	ioctl(fd, TUNGETSNDBUF, &got);

	/* Destination MAC: the TAP's own (the VM's gateway side). */
	unsigned char dmac[6] = { 0x02, 0, 0, 0, 0, 1 };
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	struct ifreq hw = { 0 };
	snprintf(hw.ifr_name, IFNAMSIZ, "%s", ifname);
	if (s >= 0 && !ioctl(s, SIOCGIFHWADDR, &hw))
		memcpy(dmac, hw.ifr_hwaddr.sa_data, 6);
	if (s >= 0)
		close(s);

	static unsigned char buf[2048];
	unsigned char *f = buf + hdrsz; /* vnet header: all zero (no csum, no GSO) */
	static const unsigned char vm_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
	memcpy(f, dmac, 6);
	memcpy(f + 6, vm_mac, 6);
	f[12] = 0x08;
	f[13] = 0x00;
	struct iphdr *ip = (struct iphdr *)(f + 14);
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = htons(flen - 14);
	ip->id = htons(1);
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	inet_pton(AF_INET, deny ? "192.168.64.2" : "10.66.0.9", &ip->saddr);
	inet_pton(AF_INET, deny ? "198.51.100.9" : "203.0.113.7", &ip->daddr);
	ip->check = csum(ip, 20);
	struct udphdr *udp = (struct udphdr *)(ip + 1);
	udp->source = htons(40000);
	udp->dest = htons(deny ? 53 : 51900);
	udp->len = htons(flen - 14 - 20);
	size_t len = hdrsz + flen;

	unsigned long long st0[2][8] = { { 0 } }, st1[2][8] = { { 0 } };
	struct rusage r0, r1;
	unsigned long long ok = 0, eagain = 0, other = 0;
	int last_err = 0;
	read_stat(st0);
	getrusage(RUSAGE_SELF, &r0);
	double t0 = now(), t1, end = t0 + secs;
	for (;;) {
		for (int i = 0; i < 1024; i++) {
			ssize_t n = write(fd, buf, len);
			if (n == (ssize_t)len)
				ok++;
			else if (n < 0 && errno == EAGAIN)
				eagain++;
			else {
				other++;
				last_err = n < 0 ? errno : 0;
			}
		}
		if ((t1 = now()) >= end)
			break;
	}
	getrusage(RUSAGE_SELF, &r1);
	read_stat(st1);
	double ut = tv(r1.ru_utime) - tv(r0.ru_utime), stt = tv(r1.ru_stime) - tv(r0.ru_stime);
	double el = t1 - t0, cpu_s = ut + stt;
	printf("written=%llu eagain=%llu errors=%llu last_err=%d sndbuf=%d frame=%d vnet=%d kind=%s "
	       "wall=%.3f utime=%.3f stime=%.3f rate=%.0f rate_per_cpu=%.0f cpu_s_per_M=%.4f "
	       "nvcsw=%ld nivcsw=%ld",
	       ok, eagain, other, last_err, got, flen, vnet, deny ? "deny" : "spoof", el, ut, stt,
	       ok / el, ok / cpu_s, cpu_s / (ok / 1e6), r1.ru_nvcsw - r0.ru_nvcsw,
	       r1.ru_nivcsw - r0.ru_nivcsw);
	static const char *nm[8] = { "user", "nice", "sys", "idle", "iowait", "irq", "softirq", "steal" };
	for (int c = 0; c < 2; c++)
		for (int k = 0; k < 8; k++)
			if (k != 1 && k != 4)
				printf(" cpu%d_%s=%llu", c, nm[k], st1[c][k] - st0[c][k]);
	printf("\n");
	close(fd);
	return 0;
}
