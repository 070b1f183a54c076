/*
 * ping: the active side of a doorbell ping-pong over a shared channel.
 *
 *   peer=ID chan=ID vector=V (default 0x40) rounds=N (default 1000)
 *   stream=MiB (default 0) slot=KiB (default 256)
 *
 * At CPL3 with interrupts on: attach the channel, wait for pong's READY,
 * then N rounds of { write seq; DOORBELL(peer); poll until pong echoes seq }.
 * With stream=M, then M MiB through the channel's ring (rep movsb in, pong
 * copies out), no hypercall in the loop. Prints per-round and streaming
 * figures (TSC, calibrated at CPL0) and the doorbell interrupts it received.
 */
#include "pingpong.h"

#define BUF_MAX (1UL << 20)

static u64 peer, chan, vector, rounds, stream_mib, slot_kib;
static u8 src[BUF_MAX];

static u64 ns(u64 cycles) { return cycles * 1000 / (rt_tsc_hz / 1000000); }

static void stream(struct pp_chan *ch, u64 chan_size)
{
	u64 slot = slot_kib << 10;
	u64 nslots = (chan_size - PP_RING_OFFSET) / slot;
	if (slot == 0 || slot > BUF_MAX || nslots == 0) {
		rt_printf("ping: stream: slot %lu KiB does not fit\n", slot_kib);
		rt_exit(EXIT_BADARG);
	}
	u64 total = (stream_mib << 20) / slot;
	for (u64 i = 0; i < slot; i++)
		src[i] = (u8)(i * 7);
	u8 *ring = (u8 *)ch + PP_RING_OFFSET;
	ch->slot_size = slot;
	ch->nslots = nslots;
	ch->total_slots = total;
	ch->head = 0;
	ch->tail = 0;
	barrier();
	ch->ping = PP_STREAM;
	u64 t0 = rdtsc();
	for (u64 k = 0; k < total; k++) {
		while (k - ch->tail >= nslots)
			cpu_relax();
		u8 *d = ring + (k % nslots) * slot;
		pp_copy(d, src, slot);
		*(volatile u64 *)d = k; /* pong checks each slot's number */
		barrier();
		ch->head = k + 1;
	}
	while (ch->pong != PP_STREAM)
		cpu_relax();
	u64 t = ns(rdtsc() - t0);
	u64 bytes = total * slot;
	rt_printf("ping: stream bytes=%lu ns=%lu MBps=%lu bad=%lu\n", bytes, t,
		  t ? bytes * 1000 / t : 0, ch->bad_slots);
}

static void user_main(void)
{
	long gpa = hc_attach(chan, 0);
	if (gpa < 0) {
		rt_printf("ping: attach=%ld\n", gpa);
		rt_exit(EXIT_FAIL);
	}
	struct pp_chan *ch = (struct pp_chan *)gpa;
	static u64 info[512];
	hc_call(HC_PARTITION_INFO, (u64)info, sizeof(info), 0, 0);
	const struct hc_info *h = (const void *)info;
	const struct hc_info_channel *c = (const void *)(h + 1);
	u64 chan_size = 0;
	for (u32 i = 0; i < h->channel_count; i++)
		if (c[i].channel_id == chan)
			chan_size = c[i].size;
	while (ch->ready != PP_READY)
		cpu_relax();
	u64 t0 = rdtsc();
	for (u64 i = 1; i <= rounds; i++) {
		ch->ping = i;
		long r = hc_doorbell(peer, 0, vector);
		if (r) {
			rt_printf("ping: doorbell=%ld\n", r);
			rt_exit(EXIT_FAIL);
		}
		while (ch->pong != i)
			cpu_relax();
	}
	u64 t1 = rdtsc();
	rt_printf("ping: rounds=%lu ns_per_round=%lu irqs=%lu\n", rounds,
		  rounds ? ns(t1 - t0) / rounds : 0, hc_irq_count);
	if (stream_mib)
		stream(ch, chan_size);
	ch->ping = PP_DONE;
	hc_doorbell(peer, 0, vector);
	rt_printf("ping: detach=%ld\n", hc_detach(chan));
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	peer = rt_arg_u64("peer", 1);
	chan = rt_arg_u64("chan", 0);
	vector = rt_arg_u64("vector", 0x40);
	rounds = rt_arg_u64("rounds", 1000);
	stream_mib = rt_arg_u64("stream", 0);
	slot_kib = rt_arg_u64("slot", 256);
	rt_calibrate_tsc();
	rt_printf("ping: tsc_hz=%lu\n", rt_tsc_hz);
	hc_irq_setup();
	hc_enter_user_irq(user_main);
}
