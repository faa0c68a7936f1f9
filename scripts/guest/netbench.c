/* netbench: TCP throughput and round trips from inside the test guest, against the host's
 * side of the benchmark (test/bench/net-bench.ts), which sinks, sources or echoes.
 *
 *   netbench send HOST PORT SECONDS   stream to the host (guest to host)
 *   netbench recv HOST PORT SECONDS   take what the host streams (host to guest)
 *   netbench rr   HOST PORT SECONDS   one byte there and back, one at a time
 *
 * Prints one line:
 *   NETBENCH <mode> bytes=<n> ops=<n> ms=<n> MiBps=<x.x> tps=<n>
 * Connecting is retried for 60 s: the host may still be setting its end up.
 * Built static at fixture time (no library in the guest). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int dial(const char *host, int port)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons(port);
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "netbench: %s is not an IPv4 address\n", host);
		exit(2);
	}
	double give_up = now() + 60;
	for (;;) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) {
			perror("netbench: socket");
			exit(1);
		}
		if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
			return fd;
		close(fd);
		if (now() > give_up) {
			perror("netbench: connect");
			exit(1);
		}
		usleep(200000);
	}
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: netbench send|recv|rr HOST PORT SECONDS\n");
		return 2;
	}
	const char *mode = argv[1];
	int fd = dial(argv[2], atoi(argv[3]));
	double seconds = atof(argv[4]);
	static char buf[1 << 16];
	memset(buf, 0x5a, sizeof buf);
	uint64_t bytes = 0, ops = 0;
	double start = now(), end = start + seconds;
	if (strcmp(mode, "send") == 0) {
		while (now() < end) {
			ssize_t n = write(fd, buf, sizeof buf);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				perror("netbench: write");
				return 1;
			}
			bytes += n;
			ops++;
		}
	} else if (strcmp(mode, "recv") == 0) {
		while (now() < end) {
			ssize_t n = read(fd, buf, sizeof buf);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				fprintf(stderr, "netbench: the host stopped sending\n");
				return 1;
			}
			bytes += n;
			ops++;
		}
	} else if (strcmp(mode, "rr") == 0) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		while (now() < end) {
			if (write(fd, buf, 1) != 1) {
				perror("netbench: write");
				return 1;
			}
			ssize_t n;
			do
				n = read(fd, buf, 1);
			while (n < 0 && errno == EINTR);
			if (n != 1) {
				fprintf(stderr, "netbench: no answer\n");
				return 1;
			}
			bytes += 2;
			ops++;
		}
	} else {
		fprintf(stderr, "netbench: unknown mode %s\n", mode);
		return 2;
	}
	double ms = (now() - start) * 1000;
	close(fd);
	printf("NETBENCH %s bytes=%llu ops=%llu ms=%.0f MiBps=%.1f tps=%.0f\n", mode, (unsigned long long)bytes, (unsigned long long)ops, ms,
	       bytes / 1048576.0 / (ms / 1000), ops / (ms / 1000));
	return 0;
}
