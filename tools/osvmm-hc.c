/*
 * osvmm-hc: the osvmm hypercalls from a Linux partition (docs/hypercalls.md).
 *
 *   osvmm-hc info                        this partition: id, vCPUs, memory, channels, doorbells
 *   osvmm-hc console TEXT...             a line on the VMM's debug console
 *   osvmm-hc attach CHANNEL [ro]         map a channel (prints its guest-physical address)
 *   osvmm-hc detach CHANNEL              unmap it
 *   osvmm-hc ring PARTITION VECTOR [VCPU]  raise VECTOR on a vCPU of PARTITION (a doorbell)
 *   osvmm-hc send CHANNEL TEXT [PARTITION VECTOR]  put a message in the channel, ring the peer
 *   osvmm-hc recv CHANNEL [SECONDS]      wait for the next message in the channel, print it
 *
 * Run as root: the hypercall port needs ioperm(0x510, 4, 1); buffers passed to
 * the VMM are locked pages whose physical address comes from
 * /proc/self/pagemap; a channel is reached through /dev/mem at its slot, which
 * the VMM reserves in the e820 map (so CONFIG_STRICT_DEVMEM allows it).
 * A message is { u64 seq; u32 len; u32 pad; char text[] } at the channel's start.
 *
 * Build: gcc -static -O2 -o osvmm-hc tools/osvmm-hc.c
 * Exit status: 0 on success, 1 when a hypercall failed (its -errno is printed), 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HC_PORT 0x510
enum { PARTITION_INFO, CONSOLE_WRITE, DOORBELL, CHANNEL_ATTACH, CHANNEL_DETACH, PARTITION_CONTROL };
#define ATTACH_READONLY 1
#define HC_EBUSY 16
#define PAGE 4096UL

struct info {
	uint32_t abi_version, length, partition_id, vcpu_count;
	uint64_t memory_size;
	uint32_t flags, channel_count;
	uint64_t doorbell_mask;
};
struct info_channel {
	uint32_t channel_id, flags;
	uint64_t gpa, size;
};
struct message {
	volatile uint64_t seq;
	uint32_t len, pad;
	char text[];
};

static void die(const char *what);

/* One hypercall; the first one asks for the port (ioperm), so bad usage makes none. */
static long hc(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
	static int have_port;
	if (!have_port) {
		if (ioperm(HC_PORT, 4, 1))
			die("ioperm(0x510) (run as root)");
		have_port = 1;
	}
	uint64_t rax = nr;
	__asm__ volatile("outl %%eax, %%dx"
			 : "+a"(rax)
			 : "d"((uint16_t)HC_PORT), "D"(a0), "S"(a1), "b"(a2), "c"(a3)
			 : "memory");
	return (long)rax;
}

static const char *errname(long r)
{
	switch (-r) {
	case 1: return "EPERM";
	case 2: return "ENOENT";
	case 3: return "ESRCH";
	case 14: return "EFAULT";
	case 16: return "EBUSY";
	case 22: return "EINVAL";
	case 28: return "ENOSPC";
	case 38: return "ENOSYS";
	}
	return "?";
}

static int failed(const char *what, long r)
{
	fprintf(stderr, "osvmm-hc: %s: -%s (%ld)\n", what, errname(r), r);
	return 1;
}

static void die(const char *what)
{
	fprintf(stderr, "osvmm-hc: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t number(const char *s)
{
	char *end;
	errno = 0;
	uint64_t v = strtoull(s, &end, 0);
	if (errno || *s == 0 || *end) {
		fprintf(stderr, "osvmm-hc: %s is not a number\n", s);
		exit(2);
	}
	return v;
}

/* A locked page and its guest-physical address (/proc/self/pagemap, root only). */
static void *phys_page(uint64_t *gpa)
{
	void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	memset(p, 0, PAGE);
	if (mlock(p, PAGE))
		die("mlock");
	int fd = open("/proc/self/pagemap", O_RDONLY);
	uint64_t entry = 0;
	if (fd < 0 || pread(fd, &entry, 8, (uintptr_t)p / PAGE * 8) != 8)
		die("/proc/self/pagemap");
	close(fd);
	if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1))) {
		fprintf(stderr, "osvmm-hc: no physical address for a page (run as root)\n");
		exit(2);
	}
	*gpa = (entry & ((1ULL << 55) - 1)) * PAGE;
	return p;
}

static struct info *get_info(void)
{
	uint64_t gpa;
	struct info *in = phys_page(&gpa);
	long r = hc(PARTITION_INFO, gpa, PAGE, 0, 0);
	if (r < 0)
		exit(failed("PARTITION_INFO", r));
	return in;
}

static const struct info_channel *find_channel(const struct info *in, uint64_t id)
{
	const struct info_channel *c = (const void *)(in + 1);
	for (uint32_t i = 0; i < in->channel_count; i++)
		if (c[i].channel_id == id)
			return &c[i];
	fprintf(stderr, "osvmm-hc: this partition is not a member of channel %lu\n",
		(unsigned long)id);
	exit(1);
}

/* Attach (unless attached already) and map the channel through /dev/mem. */
static struct message *map_channel(uint64_t id, int writable, uint64_t *size)
{
	const struct info_channel *c = find_channel(get_info(), id);
	if (!(c->flags & 2)) {
		long r = hc(CHANNEL_ATTACH, id, writable ? 0 : ATTACH_READONLY, 0, 0);
		if (r < 0 && r != -HC_EBUSY)
			exit(failed("CHANNEL_ATTACH", r));
	}
	int fd = open("/dev/mem", (writable ? O_RDWR : O_RDONLY) | O_SYNC);
	if (fd < 0)
		die("/dev/mem");
	void *p = mmap(NULL, c->size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd,
		       (off_t)c->gpa);
	if (p == MAP_FAILED)
		die("mmap /dev/mem");
	*size = c->size;
	return p;
}

static int usage(void)
{
	fprintf(stderr, "usage: osvmm-hc info | console TEXT... | attach CHANNEL [ro] | "
			"detach CHANNEL | ring PARTITION VECTOR [VCPU] |\n"
			"       send CHANNEL TEXT [PARTITION VECTOR] | recv CHANNEL [SECONDS]\n");
	return 2;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return usage();
	const char *cmd = argv[1];
	if (!strcmp(cmd, "info") && argc == 2) {
		struct info *in = get_info();
		printf("partition %u: %u vCPUs, %lu MiB, %s, doorbells to 0x%lx\n", in->partition_id,
		       in->vcpu_count, (unsigned long)(in->memory_size >> 20),
		       in->flags & 1 ? "privileged" : "unprivileged", (unsigned long)in->doorbell_mask);
		const struct info_channel *c = (const void *)(in + 1);
		for (uint32_t i = 0; i < in->channel_count; i++)
			printf("channel %u: %s, %s, gpa 0x%lx, %lu KiB\n", c[i].channel_id,
			       c[i].flags & 1 ? "rw" : "ro", c[i].flags & 2 ? "attached" : "detached",
			       (unsigned long)c[i].gpa, (unsigned long)(c[i].size >> 10));
		return 0;
	}
	if (!strcmp(cmd, "console") && argc >= 3) {
		uint64_t gpa;
		char *buf = phys_page(&gpa);
		size_t n = 0;
		for (int i = 2; i < argc; i++)
			n += (size_t)snprintf(buf + n, n < PAGE ? PAGE - n : 0, "%s%s", i > 2 ? " " : "",
					      argv[i]);
		if (n > PAGE - 2)
			n = PAGE - 2;
		buf[n++] = '\n';
		long r = hc(CONSOLE_WRITE, gpa, n, 0, 0);
		return r < 0 ? failed("CONSOLE_WRITE", r) : 0;
	}
	if (!strcmp(cmd, "attach") && (argc == 3 || (argc == 4 && !strcmp(argv[3], "ro")))) {
		long r = hc(CHANNEL_ATTACH, number(argv[2]), argc == 4 ? ATTACH_READONLY : 0, 0, 0);
		if (r < 0)
			return failed("CHANNEL_ATTACH", r);
		printf("0x%lx\n", r);
		return 0;
	}
	if (!strcmp(cmd, "detach") && argc == 3) {
		long r = hc(CHANNEL_DETACH, number(argv[2]), 0, 0, 0);
		return r < 0 ? failed("CHANNEL_DETACH", r) : 0;
	}
	if (!strcmp(cmd, "ring") && (argc == 4 || argc == 5)) {
		long r = hc(DOORBELL, number(argv[2]), argc == 5 ? number(argv[4]) : 0, number(argv[3]),
			    0);
		return r < 0 ? failed("DOORBELL", r) : 0;
	}
	if (!strcmp(cmd, "send") && (argc == 4 || argc == 6)) {
		uint64_t size;
		struct message *m = map_channel(number(argv[2]), 1, &size);
		size_t len = strlen(argv[3]);
		if (len > size - sizeof(*m))
			len = size - sizeof(*m);
		memcpy(m->text, argv[3], len);
		m->len = (uint32_t)len;
		__atomic_store_n(&m->seq, m->seq + 1, __ATOMIC_RELEASE);
		if (argc == 6) {
			long r = hc(DOORBELL, number(argv[4]), 0, number(argv[5]), 0);
			if (r < 0)
				return failed("DOORBELL", r);
		}
		return 0;
	}
	if (!strcmp(cmd, "recv") && (argc == 3 || argc == 4)) {
		uint64_t size;
		struct message *m = map_channel(number(argv[2]), 0, &size);
		uint64_t seen = __atomic_load_n(&m->seq, __ATOMIC_ACQUIRE);
		double limit = argc == 4 ? (double)number(argv[3]) : 1e18;
		struct timespec t0, t;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		while (__atomic_load_n(&m->seq, __ATOMIC_ACQUIRE) == seen) {
			clock_gettime(CLOCK_MONOTONIC, &t);
			if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > limit) {
				fprintf(stderr, "osvmm-hc: no message within %s s\n", argv[3]);
				return 1;
			}
			usleep(1000);
		}
		uint32_t len = m->len;
		if (len > size - sizeof(*m))
			len = (uint32_t)(size - sizeof(*m));
		printf("%.*s\n", (int)len, m->text);
		return 0;
	}
	return usage();
}
