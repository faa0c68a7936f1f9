/* blkbench: block device throughput from inside the test guest, with O_DIRECT so the
 * guest's page cache is out of the way and every request reaches the virtio disk.
 *
 *   blkbench DEVICE MODE BLOCK_BYTES SECONDS [DEPTH]
 *     MODE  seqread | seqwrite | randread | randwrite
 *     DEPTH requests in flight (one thread each, default 1)
 *
 * Prints one line:
 *   BLKBENCH <mode> bs=<bytes> depth=<n> ops=<n> bytes=<n> ms=<n> MiBps=<x.x> IOPS=<n>
 * Sequential modes walk the device from the start, each thread its own stripe, wrapping at
 * the end; random modes pick block-aligned offsets from a per-thread xorshift generator.
 * Built static at fixture time (no library in the guest). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum mode { SEQREAD, SEQWRITE, RANDREAD, RANDWRITE };

struct job {
	int fd;
	enum mode mode;
	size_t bs;
	uint64_t blocks;
	int index, depth;
	double deadline;
	uint64_t ops;
	int failed;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *run(void *arg)
{
	struct job *j = arg;
	void *buf;
	if (posix_memalign(&buf, 4096, j->bs)) {
		j->failed = 1;
		return NULL;
	}
	memset(buf, 0x5a + j->index, j->bs);
	uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(j->index + 1);
	uint64_t seq = (j->blocks / j->depth) * j->index;
	while (now() < j->deadline) {
		/* A batch between clock reads: the clock is not what is measured. */
		for (int k = 0; k < 16; k++) {
			uint64_t block;
			if (j->mode == SEQREAD || j->mode == SEQWRITE) {
				block = seq++ % j->blocks;
			} else {
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				block = x % j->blocks;
			}
			off_t off = (off_t)(block * j->bs);
			ssize_t n = (j->mode == SEQREAD || j->mode == RANDREAD) ? pread(j->fd, buf, j->bs, off) : pwrite(j->fd, buf, j->bs, off);
			if (n != (ssize_t)j->bs) {
				perror("blkbench: I/O");
				j->failed = 1;
				free(buf);
				return NULL;
			}
			j->ops++;
		}
	}
	free(buf);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: blkbench DEVICE seqread|seqwrite|randread|randwrite BLOCK_BYTES SECONDS [DEPTH]\n");
		return 2;
	}
	enum mode mode;
	if (!strcmp(argv[2], "seqread")) mode = SEQREAD;
	else if (!strcmp(argv[2], "seqwrite")) mode = SEQWRITE;
	else if (!strcmp(argv[2], "randread")) mode = RANDREAD;
	else if (!strcmp(argv[2], "randwrite")) mode = RANDWRITE;
	else {
		fprintf(stderr, "blkbench: unknown mode %s\n", argv[2]);
		return 2;
	}
	size_t bs = strtoul(argv[3], NULL, 0);
	double secs = strtod(argv[4], NULL);
	int depth = argc > 5 ? atoi(argv[5]) : 1;
	if (bs == 0 || bs % 512 || secs <= 0 || depth < 1 || depth > 64) {
		fprintf(stderr, "blkbench: bad block size, duration or depth\n");
		return 2;
	}
	int write = mode == SEQWRITE || mode == RANDWRITE;
	int fd = open(argv[1], (write ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	uint64_t size = 0;
	struct stat st;
	/* A block device says its size by ioctl; a file (a test on the host) by fstat. */
	if (ioctl(fd, BLKGETSIZE64, &size) && fstat(fd, &st) == 0) size = st.st_size;
	if (size < bs) {
		fprintf(stderr, "blkbench: cannot size %s\n", argv[1]);
		return 1;
	}
	struct job jobs[64];
	pthread_t threads[64];
	double start = now();
	for (int i = 0; i < depth; i++) {
		jobs[i] = (struct job){ .fd = fd, .mode = mode, .bs = bs, .blocks = size / bs, .index = i, .depth = depth, .deadline = start + secs };
		if (pthread_create(&threads[i], NULL, run, &jobs[i])) {
			perror("pthread_create");
			return 1;
		}
	}
	uint64_t ops = 0;
	int failed = 0;
	for (int i = 0; i < depth; i++) {
		pthread_join(threads[i], NULL);
		ops += jobs[i].ops;
		failed |= jobs[i].failed;
	}
	double elapsed = now() - start;
	if (failed) return 1;
	printf("BLKBENCH %s bs=%zu depth=%d ops=%llu bytes=%llu ms=%.0f MiBps=%.1f IOPS=%.0f\n", argv[2], bs, depth, (unsigned long long)ops,
	       (unsigned long long)(ops * bs), elapsed * 1000, ops * bs / elapsed / 1048576.0, ops / elapsed);
	return 0;
}
