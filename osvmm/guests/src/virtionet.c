/*
 * virtionet: a virtio-net driver at CPL0, as small as one can be, and a test of
 * a network between two partitions: one guest sends (send=1), the other
 * receives (the default).
 *   - finds the nic=K-th (default 0) virtio-net device among the virtio-mmio
 *     slots (0xc0000000 + i * 0x1000, ISA IRQ 5, 6, 7, 10, 11, 14, 15: the
 *     VMM's arch/x86/layout.py), probes it (magic, version 2, device 1),
 *     negotiates VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC, reads its MAC from
 *     the configuration space, sets up receiveq (16 buffers of 2 KiB, all
 *     given to the device) and transmitq (one frame in flight) and DRIVER_OK;
 *   - frames carry EtherType 0x88b5 (IEEE local experimental) and a payload
 *     of a kind byte, a sequence number (le32), a data length L (le16), L
 *     bytes of a pattern of the sequence number, and a checksum of the L
 *     bytes (le32);
 *   - the receiver broadcasts HELLO once ready and answers each PROBE with a
 *     HELLO; the sender broadcasts PROBE once ready and waits for a HELLO, from
 *     whose source it takes the receiver's MAC. A frame is lost only when its
 *     receiver's driver has not reset its device yet, and that one says HELLO
 *     or PROBE after its reset: so the two meet whoever starts first;
 *   - the sender then sends count=N (default 32) DATA frames to the receiver
 *     (L from 40 to 1439 bytes), one frame to 02:00:00:00:00:01 (a MAC on no
 *     member: flooded by a learning switch), one frame of 1515 bytes (over the
 *     switch's 1514: dropped), and END with N; the receiver checks every DATA
 *     frame (in order, its length, its pattern and checksum), counts the frames
 *     addressed to other MACs, which it ignores, and fails on any frame over
 *     1514 bytes;
 *   - watch=1 makes a third kind, a watcher: silent but for WATCH (broadcast
 *     once ready, and the answer to a PROBE), it counts the DATA frames that
 *     reach its NIC whatever their address (a learning switch sends it none)
 *     and ends on the sender's broadcast BYE; a sender with watchers=W waits
 *     for W watchers' WATCH as well as a HELLO, and says BYE after END;
 *   - arp=IP ip=IP (IPv4 addresses as numbers) first asks by ARP who has arp;
 *     len=L fixes every DATA frame's L; rate=1 makes the receiver calibrate
 *     the TSC and time the DATA frames;
 *   - each wait is `sti; hlt` until the device's interrupt (I/O APIC pin =
 *     the slot's IRQ, vector 0x50) or the LAPIC timer's (every 100 ms, so that
 *     a lost frame ends in a timeout after about budget=B (default 150) times
 *     10^9 TSC cycles instead of a hang).
 * Prints "virtionet: mac XX:XX:XX:XX:XX:XX", then the sender "virtionet: sent
 * N frames to XX:XX:XX:XX:XX:XX" and the receiver "virtionet: received N
 * frames ok" and "virtionet: ignored F frames for other MACs" (with rate=1
 * "virtionet: N frames in U us, R frames/s"), a watcher "virtionet: watched N
 * DATA frames" and the ignored line; exits 0. A
 * failed step prints "virtionet: FAIL <what>" and exits EXIT_FAIL.
 */
#include "hypercall.h"

#define NET_VECTOR 0x50
#define TIMER_VECTOR 0x41
#define TIMER_COUNT 100000000 /* KVM's APIC bus runs at 1 GHz: 100 ms */
#define QSIZE 16
#define BUF 2048
#include "virtio_mmio.h"

#define VIRTIO_NET_F_MAC 5
#define RXQ 0
#define TXQ 1
#define NET_HDR 12 /* struct virtio_net_hdr_v1 */

#define ETHERTYPE 0x88b5
#define ETH_HLEN 14
#define MAX_FRAME 1514
#define K_PROBE 'P'
#define K_HELLO 'H'
#define K_DATA 'D'
#define K_OTHER 'X'
#define K_OVERSIZE 'O'
#define K_END 'E'
#define K_WATCH 'W'
#define K_BYE 'B'
#define MAX_WATCHERS 8
#define P_KIND ETH_HLEN
#define P_SEQ (ETH_HLEN + 1)
#define P_LEN (ETH_HLEN + 5)
#define P_DATA (ETH_HLEN + 7)

static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const u8 nowhere[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};

static struct ring rxq, txq;
static u8 rxbuf[QSIZE][BUF] __attribute__((aligned(64)));
static u8 txbuf[BUF] __attribute__((aligned(64)));
static u16 rx_seen, tx_seen;
static u64 deadline;
static u8 mac[6], peer[6];
static int have_peer;
static int sender, watcher;
static u32 watchers, nwatch; /* the sender waits for this many watchers' WATCH */
static u8 watcher_mac[MAX_WATCHERS][6];
static u32 seen_data; /* a watcher's: DATA frames that reached its NIC, for any MAC */
static u32 count;
static u32 my_ip, arp_ip; /* IPv4 addresses as numbers: 10.0.0.1 is 0x0a000001 */
static u8 arp_mac[6];
static int arp_done;

/* Receiver's tally. */
static u32 received, expect_seq, others, ended, end_count;
static u64 first_tsc, end_tsc; /* the first DATA frame's arrival, END's */
static const char *bad;

static NORETURN void fail(const char *what)
{
	rt_printf("virtionet: FAIL %s\n", what);
	rt_exit(EXIT_FAIL);
}

static void put_mac(const u8 *m)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		if (i)
			rt_putc(':');
		rt_putc(hex[m[i] >> 4]);
		rt_putc(hex[m[i] & 15]);
	}
}

static inline u8 pattern(u32 seq, u32 i) { return (u8)(seq * 13 + i * 7 + 1); }
static u32 fixed_len; /* len=L: every DATA frame's L; 0: 40 + (seq * 97) % 1400 */
static inline u32 data_len(u32 seq) { return fixed_len ? fixed_len : 40 + (seq * 97) % 1400; }

static u32 checksum(const u8 *p, u32 n)
{
	u32 sum = 0;
	for (u32 i = 0; i < n; i++)
		sum = (sum << 5) + sum + p[i]; /* sum * 33 + byte (djb2) */
	return sum;
}

static inline void put32(u8 *p, u32 v)
{
	p[0] = (u8)v;
	p[1] = (u8)(v >> 8);
	p[2] = (u8)(v >> 16);
	p[3] = (u8)(v >> 24);
}
static inline u32 get32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static inline void put_ip(u8 *p, u32 ip)
{
	p[0] = (u8)(ip >> 24);
	p[1] = (u8)(ip >> 16);
	p[2] = (u8)(ip >> 8);
	p[3] = (u8)ip;
}
static inline u32 get_ip(const u8 *p) { return (u32)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }

/* Sleep until an interrupt (the device's or the timer's); acknowledge the device. */
static void wait_irq(void)
{
	if (rdtsc() > deadline) {
		if (arp_ip && !arp_done)
			fail("timed out (no ARP reply)");
		if (sender)
			fail("timed out (no HELLO from a receiver or WATCH from a watcher)");
		fail(watcher ? "timed out (no BYE from a sender)" : "timed out (no END from a sender)");
	}
	__asm__ volatile("sti; hlt; cli" ::: "memory");
	virtio_ack();
}

static void transmit(u32 frame);

static void send_frame(const u8 *dst, u8 kind, u32 seq, u32 len)
{
	u8 *f = txbuf + NET_HDR;
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xff;
	f[P_KIND] = kind;
	put32(f + P_SEQ, seq);
	f[P_LEN] = (u8)len;
	f[P_LEN + 1] = (u8)(len >> 8);
	for (u32 i = 0; i < len; i++)
		f[P_DATA + i] = pattern(seq, i);
	put32(f + P_DATA + len, checksum(f + P_DATA, len));
	transmit(P_DATA + len + 4);
}

/* Send the frame at txbuf + NET_HDR (the header zeroed here) and wait until the
 * device has taken it. */
static void transmit(u32 frame)
{
	memset(txbuf, 0, NET_HDR);
	if (frame < 60) {
		memset(txbuf + NET_HDR + frame, 0, 60 - frame);
		frame = 60; /* Ethernet's minimum, padded with zeros */
	}
	txq.desc[0] = (struct desc){(u64)txbuf, NET_HDR + frame, 0, 0};
	txq.avail_ring[txq.avail_idx % QSIZE] = 0;
	mb();
	txq.avail_idx++;
	mb();
	wr(R_QUEUE_NOTIFY, TXQ);
	while (*(volatile u16 *)&txq.used_idx == tx_seen)
		wait_irq();
	tx_seen++;
}

static void note_bad(const char *what)
{
	if (!bad)
		bad = what;
}

static void check_data(const u8 *f, u32 n)
{
	u32 seq = get32(f + P_SEQ);
	u32 len = f[P_LEN] | f[P_LEN + 1] << 8;
	if (seq != expect_seq) {
		note_bad("a DATA frame out of order");
		expect_seq = seq;
	}
	expect_seq++;
	if (len != data_len(seq) || n < P_DATA + len + 4) {
		note_bad("a DATA frame of the wrong length");
		return;
	}
	for (u32 i = 0; i < len; i++)
		if (f[P_DATA + i] != pattern(seq, i)) {
			note_bad("a DATA frame's bytes differ from the pattern");
			return;
		}
	if (get32(f + P_DATA + len) != checksum(f + P_DATA, len)) {
		note_bad("a DATA frame's checksum differs");
		return;
	}
	received++;
}

/* ARP (RFC 826) for IPv4 over Ethernet: who has arp_ip? tell my_ip. */
static void send_arp_request(void)
{
	u8 *f = txbuf + NET_HDR;
	static const u8 arp_head[8] = {0, 1, 8, 0, 6, 4, 0, 1}; /* Ethernet, IPv4, request */
	memcpy(f, bcast, 6);
	memcpy(f + 6, mac, 6);
	f[12] = 0x08;
	f[13] = 0x06;
	memcpy(f + 14, arp_head, 8);
	memcpy(f + 22, mac, 6);
	put_ip(f + 28, my_ip);
	memset(f + 32, 0, 6);
	put_ip(f + 38, arp_ip);
	transmit(42);
}

static void handle_arp(const u8 *f, u32 n)
{
	static const u8 reply_head[8] = {0, 1, 8, 0, 6, 4, 0, 2};
	if (n < 42 || memcmp(f + 14, reply_head, 8) != 0 || memcmp(f, mac, 6) != 0)
		return;
	if (get_ip(f + 28) != arp_ip || get_ip(f + 38) != my_ip)
		return;
	memcpy(arp_mac, f + 22, 6);
	arp_done = 1;
}

static void handle(const u8 *f, u32 n)
{
	if (n > MAX_FRAME)
		note_bad("a frame over 1514 bytes was delivered");
	if (arp_ip && n >= ETH_HLEN && f[12] == 0x08 && f[13] == 0x06) {
		handle_arp(f, n);
		return;
	}
	if (n < P_DATA || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xff))
		return; /* not ours */
	u8 kind = f[P_KIND];
	if (watcher && kind == K_DATA)
		seen_data++; /* before the NIC's filter: what the switch delivered here */
	if (memcmp(f, mac, 6) != 0 && memcmp(f, bcast, 6) != 0) {
		others++; /* a NIC takes frames for its own MAC and broadcast only */
		return;
	}
	if (sender) {
		if (kind == K_HELLO && !have_peer) {
			memcpy(peer, f + 6, 6);
			have_peer = 1;
		} else if (kind == K_WATCH && nwatch < MAX_WATCHERS) {
			for (u32 i = 0; i < nwatch; i++)
				if (memcmp(watcher_mac[i], f + 6, 6) == 0)
					return;
			memcpy(watcher_mac[nwatch++], f + 6, 6);
		}
		return;
	}
	if (watcher) {
		if (kind == K_PROBE)
			send_frame(f + 6, K_WATCH, 0, 0);
		else if (kind == K_BYE)
			ended = 1;
		return;
	}
	if (kind == K_PROBE)
		send_frame(f + 6, K_HELLO, 0, 0);
	else if (kind == K_DATA) {
		if (!first_tsc)
			first_tsc = rdtsc();
		check_data(f, n);
	} else if (kind == K_END) {
		end_tsc = rdtsc();
		ended = 1;
		end_count = get32(f + P_SEQ);
	}
}

/* Take every received frame, give its buffer back, tell the device. */
static void poll_rx(void)
{
	int given = 0;
	while (*(volatile u16 *)&rxq.used_idx != rx_seen) {
		u32 id = rxq.used_ring[rx_seen % QSIZE].id;
		u32 len = rxq.used_ring[rx_seen % QSIZE].len;
		rx_seen++;
		if (id >= QSIZE || len < NET_HDR)
			fail("a bad used entry in receiveq");
		handle(rxbuf[id] + NET_HDR, len - NET_HDR);
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
	sender = (int)rt_arg_u64("send", 0);
	watcher = !sender && rt_arg_u64("watch", 0);
	watchers = (u32)rt_arg_u64("watchers", 0);
	if (watchers > MAX_WATCHERS)
		fail("watchers= is over 8");
	count = (u32)rt_arg_u64("count", 32);
	u32 nic = (u32)rt_arg_u64("nic", 0);
	arp_ip = (u32)rt_arg_u64("arp", 0);
	my_ip = (u32)rt_arg_u64("ip", 0);
	fixed_len = (u32)rt_arg_u64("len", 0);
	int rate = (int)rt_arg_u64("rate", 0);
	if (fixed_len > MAX_FRAME - P_DATA - 4)
		fail("len= is over 1489 (a frame over 1514 bytes)");
	if (rate)
		rt_calibrate_tsc(); /* before the PIC is masked; the PIT's pin stays masked */
	deadline = rdtsc() + rt_arg_u64("budget", 150) * 1000000000UL;
	hc_irq_setup();
	if (!virtio_find(1, nic, NET_VECTOR))
		fail("no virtio-mmio version 2 network device");
	lapic_periodic(TIMER_VECTOR, TIMER_COUNT);

	virtio_begin();
	if (!(virtio_offered(0) & (1 << VIRTIO_NET_F_MAC)))
		fail("no VIRTIO_NET_F_MAC");
	const char *err = virtio_accept(1 << VIRTIO_NET_F_MAC);
	if (!err)
		err = virtio_setup_queue(RXQ, &rxq);
	if (!err)
		err = virtio_setup_queue(TXQ, &txq);
	if (err)
		fail(err);
	for (int i = 0; i < 6; i++)
		mac[i] = *(volatile u8 *)(virtio_base + R_CONFIG + i);
	virtio_fill_rx(&rxq, &rxbuf[0][0], BUF);
	virtio_driver_ok();
	mb();
	wr(R_QUEUE_NOTIFY, RXQ); /* buffers to take frames into: the device looks */
	rt_printf("virtionet: mac ");
	put_mac(mac);
	rt_putc('\n');

	if (arp_ip) {
		send_arp_request();
		while (!arp_done) {
			poll_rx();
			if (!arp_done)
				wait_irq();
		}
		rt_printf("virtionet: arp %u.%u.%u.%u is at ", arp_ip >> 24, (arp_ip >> 16) & 255,
			  (arp_ip >> 8) & 255, arp_ip & 255);
		put_mac(arp_mac);
		rt_putc('\n');
	}
	if (sender) {
		send_frame(bcast, K_PROBE, 0, 0);
		while (!have_peer || nwatch < watchers) {
			poll_rx();
			if (!have_peer || nwatch < watchers)
				wait_irq();
		}
		for (u32 seq = 0; seq < count; seq++)
			send_frame(peer, K_DATA, seq, data_len(seq));
		send_frame(nowhere, K_OTHER, 0, 0);
		send_frame(peer, K_OVERSIZE, 0, MAX_FRAME + 1 - P_DATA - 4);
		send_frame(peer, K_END, count, 0);
		if (watchers)
			send_frame(bcast, K_BYE, 0, 0);
		rt_printf("virtionet: sent %u frames to ", count);
		put_mac(peer);
		rt_putc('\n');
		return EXIT_OK;
	}
	send_frame(bcast, watcher ? K_WATCH : K_HELLO, 0, 0);
	while (!ended) {
		poll_rx();
		if (!ended)
			wait_irq();
	}
	if (bad)
		fail(bad);
	if (watcher) {
		rt_printf("virtionet: watched %u DATA frames\n", seen_data);
		rt_printf("virtionet: ignored %u frames for other MACs\n", others);
		return EXIT_OK;
	}
	if (received != end_count)
		fail("fewer DATA frames than the sender sent");
	rt_printf("virtionet: received %u frames ok\n", received);
	rt_printf("virtionet: ignored %u frames for other MACs\n", others);
	if (rate && received) {
		u64 us = (end_tsc - first_tsc) / (rt_tsc_hz / 1000000);
		rt_printf("virtionet: %u frames in %lu us, %lu frames/s\n", received, us,
			  us ? (u64)received * 1000000 / us : 0);
	}
	return EXIT_OK;
}
