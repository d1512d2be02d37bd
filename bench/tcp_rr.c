/* tcp_rr.c - minimal netperf-style TCP_RR / TCP_CRR for bench/seed000_compare.sh.
 *
 *   tcp_rr server PORT             one connection at a time: read 1 byte,
 *                                  answer 1 byte, until EOF; then the next.
 *   tcp_rr rr  HOST PORT SECONDS   one connection, 1-byte request / 1-byte
 *                                  response for SECONDS:
 *                                  "trans_s=X p50_us=Y p99_us=Z n=N"
 *   tcp_rr crr HOST PORT SECONDS   connect, 1-byte request/response, close,
 *                                  repeated for SECONDS: "conn_s=X n=N errors=E"
 *
 * TCP_NODELAY on every socket. IPv4 only. Build: cc -O2 -o tcp_rr tcp_rr.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void set_opts(int fd, int timeout_s)
{
	int one = 1;
	struct timeval tv = { .tv_sec = timeout_s, .tv_usec = 0 };
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds connect() */
}

static int server(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) {
		perror("bind/listen");
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		int c = accept(s, NULL, NULL);
		char b;
		if (c < 0)
			continue;
		set_opts(c, 10);
		while (read(c, &b, 1) == 1)
			if (write(c, &b, 1) != 1)
				break;
		close(c);
	}
}

static int cmp_u32(const void *x, const void *y)
{
	uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
	return a < b ? -1 : a > b;
}

static int dial(struct sockaddr_in *a)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	set_opts(fd, 2);
	if (connect(fd, (struct sockaddr *)a, sizeof *a)) {
		close(fd);
		return -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]));
	if (argc != 5 || (strcmp(argv[1], "rr") && strcmp(argv[1], "crr"))) {
		fprintf(stderr, "usage: %s server PORT | rr HOST PORT SECONDS | crr HOST PORT SECONDS\n", argv[0]);
		return 2;
	}
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
	if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", argv[2]);
		return 2;
	}
	double secs = atof(argv[4]);
	signal(SIGPIPE, SIG_IGN);
	uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), t;
	char b = 'x';

	if (!strcmp(argv[1], "rr")) {
		int fd = dial(&a);
		if (fd < 0) {
			perror("connect");
			printf("trans_s=0 p50_us=0 p99_us=0 n=0\n");
			return 1;
		}
		size_t n = 0, cap = 1 << 20;
		uint32_t *lat = malloc(cap * sizeof *lat);
		while ((t = now_ns()) < end) {
			if (write(fd, &b, 1) != 1 || read(fd, &b, 1) != 1) {
				perror("rr");
				break;
			}
			uint64_t d = now_ns() - t;
			if (n == cap)
				lat = realloc(lat, (cap *= 2) * sizeof *lat);
			lat[n++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
		}
		double el = (now_ns() - t0) / 1e9;
		close(fd);
		qsort(lat, n, sizeof *lat, cmp_u32);
		printf("trans_s=%.1f p50_us=%.1f p99_us=%.1f n=%zu\n", n / el, n ? lat[n / 2] / 1e3 : 0.0,
		       n ? lat[(size_t)(n * 0.99)] / 1e3 : 0.0, n);
		return n ? 0 : 1;
	}
	/* crr */
	size_t n = 0, errors = 0;
	while (now_ns() < end) {
		int fd = dial(&a);
		if (fd < 0) {
			errors++;
			if (errors > 1000 && n == 0)
				break;
			continue;
		}
		if (write(fd, &b, 1) != 1 || read(fd, &b, 1) != 1)
			errors++;
		else
			n++;
		close(fd);
	}
	double el = (now_ns() - t0) / 1e9;
	printf("conn_s=%.1f n=%zu errors=%zu\n", n / el, n, errors);
	return n ? 0 : 1;
}
