/*
 * pong: the passive side of ping (ping.c). peer=ID chan=ID vector=V.
 *
 * At CPL3 with interrupts on: attach the channel, write READY, then poll:
 * each new sequence number is echoed back and the peer's doorbell rung; a
 * STREAM request consumes the ring (copying each slot out and checking its
 * number); DONE ends it. Prints the rounds and the doorbell interrupts it
 * received, then exits.
 */
#include "pingpong.h"

#define BUF_MAX (1UL << 20)

static u64 peer, chan, vector;
static u8 dst[BUF_MAX];

static void consume(struct pp_chan *ch)
{
	u64 slot = ch->slot_size, nslots = ch->nslots, total = ch->total_slots, bad = 0;
	u8 *ring = (u8 *)ch + PP_RING_OFFSET;
	for (u64 k = 0; k < total; k++) {
		while (ch->head == k)
			cpu_relax();
		const u8 *s = ring + (k % nslots) * slot;
		if (*(volatile const u64 *)s != k)
			bad++;
		pp_copy(dst, s, slot < BUF_MAX ? slot : BUF_MAX);
		barrier();
		ch->tail = k + 1;
	}
	ch->bad_slots = bad;
	barrier();
	ch->pong = PP_STREAM;
}

static void user_main(void)
{
	long gpa = hc_attach(chan, 0);
	if (gpa < 0) {
		rt_printf("pong: attach=%ld\n", gpa);
		rt_exit(EXIT_FAIL);
	}
	struct pp_chan *ch = (struct pp_chan *)gpa;
	ch->ready = PP_READY;
	u64 last = ch->ping, n = 0;
	for (;;) {
		u64 v;
		while ((v = ch->ping) == last)
			cpu_relax();
		last = v;
		if (v == PP_DONE)
			break;
		if (v == PP_STREAM) {
			consume(ch);
			continue;
		}
		ch->pong = v;
		n++;
		long r = hc_doorbell(peer, 0, vector);
		if (r) {
			rt_printf("pong: doorbell=%ld\n", r);
			rt_exit(EXIT_FAIL);
		}
	}
	rt_printf("pong: rounds=%lu irqs=%lu\n", n, hc_irq_count);
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	peer = rt_arg_u64("peer", 0);
	chan = rt_arg_u64("chan", 0);
	vector = rt_arg_u64("vector", 0x40);
	hc_irq_setup();
	hc_enter_user_irq(user_main);
}
