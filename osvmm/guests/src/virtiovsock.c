/*
 * virtiovsock: a virtio-vsock driver at CPL0, as small as one can be, and stream
 * connections both ways between the guest and the host (CID 2).
 *   - finds the first virtio-vsock device (device 19) among the virtio-mmio
 *     slots (0xc0000000 + i * 0x1000, ISA IRQ 5, 6, 7, 10, 11, 14, 15),
 *     negotiates VIRTIO_F_VERSION_1 only, reads its CID from the configuration
 *     space, sets up rx (16 buffers of 4 KiB, all given to the device), tx (one
 *     packet in flight) and event (no buffers) and DRIVER_OK;
 *   - connects to the host's port=P (default 6000; the VMM connects to the Unix
 *     socket PATH_P) from guest port 1234: REQUEST, RESPONSE; then rounds=N
 *     (default 8) times sends 64 to 2063 bytes of a pattern and waits until as
 *     many have come back (in one RW or more), compares them, and closes with
 *     SHUTDOWN (receive and send), answered with RST;
 *   - with listen=Q, also takes a connection from the host to its port Q (the
 *     host writes "CONNECT Q" on PATH): answers its REQUEST with RESPONSE,
 *     echoes every RW and, after the host's SHUTDOWN, closes as above;
 *   - every packet carries buf_alloc 64 KiB and fwd_cnt (what was received:
 *     it is consumed at once); each wait is `sti; hlt` until the device's
 *     interrupt (vector 0x50) or the LAPIC timer's (every 100 ms: a timeout
 *     after about budget=B (default 150) times 10^9 TSC cycles, not a hang).
 * Prints "virtiovsock: cid C", "virtiovsock: connected to port P",
 * "virtiovsock: echoed N rounds, B bytes ok", with listen= "virtiovsock:
 * accepted host port H on port Q, echoed B bytes", then "virtiovsock: closed"
 * and exits 0. A failed step prints "virtiovsock: FAIL <what>" and exits
 * EXIT_FAIL.
 */
#include "hypercall.h"

#define DEV_VECTOR 0x50
#define TIMER_VECTOR 0x41
#define TIMER_COUNT 100000000 /* KVM's APIC bus runs at 1 GHz: 100 ms */
#define QSIZE 16
#define BUF 4096
#include "virtio_mmio.h"

#define RXQ 0
#define TXQ 1
#define EVQ 2

#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_BOTH 3
#define SHUTDOWN_SEND 2
#define BUF_ALLOC (64 << 10)
#define LOCAL_PORT 1234

struct hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct hdr) == 44, "virtio_vsock_hdr is 44 bytes");

/* One stream: ours to the host (out), or the host's to our listening port (in). */
struct conn {
	u32 local, remote; /* ports */
	int state;	   /* 0 none, 1 requested, 2 established, 3 closing, 4 closed */
	int host_shut;	   /* the host sends no more */
	u32 fwd_cnt;	   /* bytes received (consumed at once) */
	u64 bytes;	   /* echoed (in) or compared (out) */
};
enum { NONE, REQUESTED, ESTABLISHED, CLOSING, CLOSED };


static struct ring rxq, txq, evq;
static u8 rxbuf[QSIZE][BUF] __attribute__((aligned(64)));
static u8 txbuf[BUF] __attribute__((aligned(64)));
static u8 echo[BUF], msg[BUF];
static u32 echo_have;
static u16 rx_seen, tx_seen;
static u64 deadline, cid;
static struct conn out, in;
static u32 listen_port;
static const char *bad;

static NORETURN void fail(const char *what)
{
	rt_printf("virtiovsock: FAIL %s\n", what);
	rt_exit(EXIT_FAIL);
}

static inline u8 pattern(u32 round, u32 i) { return (u8)(round * 31 + i * 5 + 3); }
static inline u32 round_len(u32 round) { return 64 + (round * 389) % 2000; }

static void wait_irq(const char *what)
{
	if (rdtsc() > deadline)
		fail(what);
	__asm__ volatile("sti; hlt; cli" ::: "memory");
	virtio_ack();
}

/* One packet to the host, header and payload in one buffer; waits until taken. */
static void send(struct conn *c, u16 op, u32 flags, const u8 *data, u32 len)
{
	struct hdr *h = (struct hdr *)txbuf;
	*h = (struct hdr){.src_cid = cid,
			  .dst_cid = HOST_CID,
			  .src_port = c->local,
			  .dst_port = c->remote,
			  .len = len,
			  .type = TYPE_STREAM,
			  .op = op,
			  .flags = flags,
			  .buf_alloc = BUF_ALLOC,
			  .fwd_cnt = c->fwd_cnt};
	if (len)
		memcpy(txbuf + sizeof(*h), data, len);
	txq.desc[0] = (struct desc){(u64)txbuf, (u32)sizeof(*h) + len, 0, 0};
	txq.avail_ring[txq.avail_idx % QSIZE] = 0;
	mb();
	txq.avail_idx++;
	mb();
	wr(R_QUEUE_NOTIFY, TXQ);
	while (*(volatile u16 *)&txq.used_idx == tx_seen)
		wait_irq("timed out (a packet not taken)");
	tx_seen++;
}

static void note_bad(const char *what)
{
	if (!bad)
		bad = what;
}

static void on_out(const struct hdr *h, const u8 *data)
{
	if (h->op == OP_RST) {
		if (out.state == REQUESTED)
			fail("connect refused (RST): nothing listens at PATH_<port>?");
		if (out.state != CLOSING)
			note_bad("our connection was reset");
		out.state = CLOSED;
	} else if (h->op == OP_RESPONSE && out.state == REQUESTED) {
		out.state = ESTABLISHED;
	} else if (h->op == OP_RW) {
		out.fwd_cnt += h->len;
		if (echo_have + h->len > sizeof(echo))
			note_bad("more echoed than sent");
		else
			memcpy(echo + echo_have, data, h->len);
		echo_have += h->len;
	} else if (h->op == OP_SHUTDOWN) {
		out.host_shut = 1;
	} else if (h->op == OP_CREDIT_REQUEST) {
		send(&out, OP_CREDIT_UPDATE, 0, 0, 0);
	}
}

static void on_in(const struct hdr *h, const u8 *data)
{
	if (h->op == OP_REQUEST && in.state == NONE) {
		in.local = h->dst_port;
		in.remote = h->src_port;
		in.state = ESTABLISHED;
		send(&in, OP_RESPONSE, 0, 0, 0);
	} else if (h->op == OP_RW) {
		in.fwd_cnt += h->len;
		in.bytes += h->len;
		send(&in, OP_RW, 0, data, h->len); /* the echo, our fwd_cnt with it */
	} else if (h->op == OP_SHUTDOWN) {
		in.host_shut = 1;
		in.state = CLOSING;
		send(&in, OP_SHUTDOWN, SHUTDOWN_BOTH, 0, 0);
	} else if (h->op == OP_RST) {
		if (in.state != CLOSING)
			note_bad("the host's connection was reset");
		in.state = CLOSED;
	} else if (h->op == OP_CREDIT_REQUEST) {
		send(&in, OP_CREDIT_UPDATE, 0, 0, 0);
	}
}

static void handle(const u8 *p, u32 n)
{
	const struct hdr *h = (const struct hdr *)p;
	if (n < sizeof(*h) || n < sizeof(*h) + h->len)
		fail("a short packet in rx");
	if (h->src_cid != HOST_CID || h->dst_cid != cid || h->type != TYPE_STREAM)
		fail("a packet not from the host to our CID");
	const u8 *data = p + sizeof(*h);
	if (out.state != NONE && h->dst_port == out.local && h->src_port == out.remote)
		on_out(h, data);
	else if (listen_port && h->dst_port == listen_port &&
		 (in.state == NONE || h->src_port == in.remote))
		on_in(h, data);
	else if (h->op != OP_RST)
		note_bad("a packet for no connection");
}

static void poll_rx(void)
{
	int given = 0;
	while (*(volatile u16 *)&rxq.used_idx != rx_seen) {
		u32 id = rxq.used_ring[rx_seen % QSIZE].id;
		u32 len = rxq.used_ring[rx_seen % QSIZE].len;
		rx_seen++;
		if (id >= QSIZE)
			fail("a bad used entry in rx");
		handle(rxbuf[id], len);
		rxq.avail_ring[rxq.avail_idx % QSIZE] = (u16)id;
		mb();
		rxq.avail_idx++;
		given = 1;
	}
	if (given) {
		mb();
		wr(R_QUEUE_NOTIFY, RXQ);
	}
}

int guest_main(void)
{
	u32 port = (u32)rt_arg_u64("port", 6000);
	u32 rounds = (u32)rt_arg_u64("rounds", 8);
	listen_port = (u32)rt_arg_u64("listen", 0);
	deadline = rdtsc() + rt_arg_u64("budget", 150) * 1000000000UL;
	hc_irq_setup();
	if (!virtio_find(19, 0, DEV_VECTOR))
		fail("no virtio-mmio version 2 vsock device");
	lapic_periodic(TIMER_VECTOR, TIMER_COUNT);

	virtio_begin();
	const char *err = virtio_accept(0);
	if (err)
		fail(err);
	cid = rd(R_CONFIG) | (u64)rd(R_CONFIG + 4) << 32;
	err = virtio_setup_queue(RXQ, &rxq);
	if (!err)
		err = virtio_setup_queue(TXQ, &txq);
	if (!err)
		err = virtio_setup_queue(EVQ, &evq);
	if (err)
		fail(err);
	virtio_fill_rx(&rxq, &rxbuf[0][0], BUF);
	virtio_driver_ok();
	mb();
	wr(R_QUEUE_NOTIFY, RXQ);
	rt_printf("virtiovsock: cid %lu\n", cid);

	out = (struct conn){LOCAL_PORT, port, REQUESTED, 0, 0, 0};
	send(&out, OP_REQUEST, 0, 0, 0);
	while (out.state == REQUESTED) {
		poll_rx();
		if (out.state == REQUESTED)
			wait_irq("timed out (no answer to our REQUEST)");
	}
	rt_printf("virtiovsock: connected to port %u\n", port);

	for (u32 r = 0; r < rounds; r++) {
		u32 len = round_len(r);
		for (u32 i = 0; i < len; i++)
			msg[i] = pattern(r, i);
		echo_have = 0;
		send(&out, OP_RW, 0, msg, len);
		while (echo_have < len && out.state == ESTABLISHED && !out.host_shut) {
			poll_rx();
			if (echo_have < len)
				wait_irq("timed out (waiting for the echo)");
		}
		if (echo_have != len || memcmp(echo, msg, len) != 0)
			fail("the echo differs from what was sent");
		out.bytes += len;
	}
	rt_printf("virtiovsock: echoed %u rounds, %lu bytes ok\n", rounds, out.bytes);
	out.state = CLOSING;
	send(&out, OP_SHUTDOWN, SHUTDOWN_BOTH, 0, 0);
	while (out.state != CLOSED || (listen_port && in.state != CLOSED)) {
		poll_rx();
		if (out.state != CLOSED || (listen_port && in.state != CLOSED))
			wait_irq(out.state != CLOSED ? "timed out (no RST for our SHUTDOWN)"
						     : "timed out (no connection from the host, or no end of it)");
	}
	if (bad)
		fail(bad);
	if (listen_port)
		rt_printf("virtiovsock: accepted host port %u on port %u, echoed %lu bytes\n",
			  in.remote, listen_port, in.bytes);
	rt_printf("virtiovsock: closed\n");
	return EXIT_OK;
}
