/* osvmm-iobench: the block benchmark's load, the same binary in a guest and on
 * the host (bench/rig_devices.py). Built with gcc -static.
 *
 *   osvmm-iobench seqread  FILE MIB      read MIB MiB in 1 MiB requests
 *   osvmm-iobench seqwrite FILE MIB      write MIB MiB in 1 MiB requests, then fsync
 *   osvmm-iobench randread FILE SECONDS  4 KiB reads at random 4 KiB offsets
 *
 * With -d first, the file is opened O_DIRECT (a guest's /dev/vda: every
 * request reaches the device, none is answered from the guest's page cache).
 * Prints one line: "iobench MODE BYTES REQUESTS SECONDS". Exit 1 on an error.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *what)
{
    perror(what);
    return 1;
}

int main(int argc, char **argv)
{
    int direct = 0;
    if (argc > 1 && strcmp(argv[1], "-d") == 0) {
        direct = O_DIRECT;
        argv++;
        argc--;
    }
    if (argc != 4) {
        fprintf(stderr, "usage: osvmm-iobench [-d] seqread|seqwrite|randread FILE N\n");
        return 2;
    }
    const char *mode = argv[1], *path = argv[2];
    long n = atol(argv[3]);
    int writing = strcmp(mode, "seqwrite") == 0;
    int fd = open(path, (writing ? O_WRONLY : O_RDONLY) | direct);
    if (fd < 0)
        return fail(path);
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20))
        return fail("posix_memalign");
    memset(buf, 0x5a, 1 << 20);
    off_t size = lseek(fd, 0, SEEK_END);
    long long bytes = 0, requests = 0;
    double start = now(), end;
    if (strcmp(mode, "randread") == 0) {
        long pages = size / 4096;
        if (pages < 1)
            return fail("file too small");
        srandom(42);
        end = start + n;
        while (now() < end) {
            off_t at = (off_t)(random() % pages) * 4096;
            if (pread(fd, buf, 4096, at) != 4096)
                return fail("pread");
            bytes += 4096;
            requests++;
        }
    } else {
        long long want = (long long)n << 20;
        if (want > size)
            want = size - size % (1 << 20);
        for (off_t at = 0; at < want; at += 1 << 20) {
            ssize_t r = writing ? pwrite(fd, buf, 1 << 20, at) : pread(fd, buf, 1 << 20, at);
            if (r != 1 << 20)
                return fail(writing ? "pwrite" : "pread");
            bytes += r;
            requests++;
        }
        if (writing && fsync(fd))
            return fail("fsync");
    }
    printf("iobench %s %lld %lld %.6f\n", mode, bytes, requests, now() - start);
    return 0;
}
