/*
 * osvmm-vsock: AF_VSOCK stream sockets from a Linux partition (docs/devices.md,
 * "virtio-vsock"), for trying the device out and for tests/test_rig_vsock.py.
 *
 *   osvmm-vsock listen PORT          accept one connection on PORT, echo what it
 *                                    sends until it ends, print the byte count
 *   osvmm-vsock send CID PORT TEXT   connect to CID:PORT (the host is CID 2), send
 *                                    TEXT and a newline, end the sending side,
 *                                    print what comes back until the peer ends
 *
 * Output lines start with "vsock: " (the test looks for them on the console).
 * The guest needs the vmw_vsock_virtio_transport module (and vsock,
 * vmw_vsock_virtio_transport_common): osvmm initramfs --module
 * vmw_vsock_virtio_transport.
 *
 * Build: gcc -static -O2 -o osvmm-vsock tools/osvmm-vsock.c
 * Exit status: 0 on success, 1 when a socket call failed (printed), 2 on bad usage.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	printf("vsock: %s failed: %s\n", what, strerror(errno));
	fflush(stdout);
	return 1;
}

static int parse_u32(const char *text, unsigned int *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(text, &end, 10);
	if (errno || *text == '\0' || *end != '\0' || v > 0xffffffffUL)
		return -1;
	*out = (unsigned int)v;
	return 0;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int do_listen(unsigned int port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
				    .svm_port = port };
	char buf[4096];
	unsigned long total = 0;
	int s, c;

	s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		return fail("socket");
	if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("bind");
	if (listen(s, 1) < 0)
		return fail("listen");
	printf("vsock: listening on %u\n", port);
	fflush(stdout);
	c = accept(s, NULL, NULL);
	if (c < 0)
		return fail("accept");
	for (;;) {
		ssize_t n = read(c, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail("read");
		if (n == 0)
			break;
		if (write_all(c, buf, (size_t)n) < 0)
			return fail("write");
		total += (unsigned long)n;
	}
	printf("vsock: echoed %lu bytes\n", total);
	fflush(stdout);
	close(c);
	close(s);
	return 0;
}

static int do_send(unsigned int cid, unsigned int port, const char *text)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	char buf[4096];
	size_t got = 0;
	int s;

	s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		return fail("socket");
	if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("connect");
	if (write_all(s, text, strlen(text)) < 0 || write_all(s, "\n", 1) < 0)
		return fail("write");
	if (shutdown(s, SHUT_WR) < 0)
		return fail("shutdown");
	while (got < sizeof(buf) - 1) {
		ssize_t n = read(s, buf + got, sizeof(buf) - 1 - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail("read");
		if (n == 0)
			break;
		got += (size_t)n;
	}
	buf[got] = '\0';
	while (got && (buf[got - 1] == '\n' || buf[got - 1] == '\r'))
		buf[--got] = '\0';
	printf("vsock: reply %s\n", buf);
	fflush(stdout);
	close(s);
	return 0;
}

int main(int argc, char **argv)
{
	unsigned int cid, port;

	if (argc == 3 && !strcmp(argv[1], "listen") && !parse_u32(argv[2], &port))
		return do_listen(port);
	if (argc == 5 && !strcmp(argv[1], "send") && !parse_u32(argv[2], &cid) &&
	    !parse_u32(argv[3], &port))
		return do_send(cid, port, argv[4]);
	fprintf(stderr, "usage: osvmm-vsock listen PORT | osvmm-vsock send CID PORT TEXT\n");
	return 2;
}
