/*
 * The channel layout ping and pong share (one channel, both members rw):
 * control words on separate cache lines in the first page, then a ring of
 * `nslots` slots of `slot_size` bytes for streaming.
 */
#ifndef OSVMM_GUEST_PINGPONG_H
#define OSVMM_GUEST_PINGPONG_H

#include "hypercall.h"

#define PP_READY 0x59444145524e4f50UL /* "PONREADY": pong attached and polling */
#define PP_DONE (~0UL)                 /* ping -> pong: stop */
#define PP_STREAM (1UL << 62)          /* ping -> pong: consume a stream; pong acks it */
#define PP_RING_OFFSET 4096

struct pp_chan {
	volatile u64 ping;
	u64 pad0[7];
	volatile u64 pong;
	u64 pad1[7];
	volatile u64 ready;
	u64 pad2[7];
	volatile u64 head; /* slots produced */
	u64 pad3[7];
	volatile u64 tail; /* slots consumed */
	u64 pad4[7];
	volatile u64 slot_size, nslots, total_slots, bad_slots;
};

static inline void pp_copy(void *dst, const void *src, u64 n)
{
	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

#endif
