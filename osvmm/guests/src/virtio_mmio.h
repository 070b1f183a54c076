/*
 * virtio_mmio.h: the virtio-mmio transport (virtio 1.x, register layout
 * version 2) for the bundled virtio guests (virtioblk, virtionet,
 * virtiovsock): the registers, split virtqueues, the slots osvmm places
 * devices in (arch/x86/layout.py: 0xc0000000 + i * 0x1000, ISA IRQs
 * 5, 6, 7, 10, 11, 14, 15 on the I/O APIC pins of the same numbers) and the
 * steps every driver takes. Each step that can fail returns what failed, or
 * 0. A guest defines QSIZE (its queues' size) before including this.
 */
#ifndef VIRTIO_MMIO_H
#define VIRTIO_MMIO_H

#include "rt.h"

#define VIRTIO_MMIO_BASE 0xc0000000UL
#define VIRTIO_MMIO_SLOTS 7
#define IOAPIC_BASE 0xfec00000UL
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define LAPIC_BASE 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_PERIODIC (1 << 17)

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_NEXT 1 /* a descriptor's flags */
#define F_WRITE 2

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

/* One split virtqueue: descriptors and the driver area in its first page,
 * the device area in the next. */
struct ring {
	struct desc desc[QSIZE];
	u16 avail_flags, avail_idx, avail_ring[QSIZE], used_event;
	u8 pad[4096 - 16 * QSIZE - 2 * (QSIZE + 3)];
	u16 used_flags, used_idx;
	struct {
		u32 id, len;
	} used_ring[QSIZE];
	u16 avail_event;
} __attribute__((aligned(4096)));

static u64 virtio_base = VIRTIO_MMIO_BASE; /* the device's registers (virtio_find) */

static inline u32 rd(u32 off) { return *(volatile u32 *)(virtio_base + off); }
static inline void wr(u32 off, u32 v) { *(volatile u32 *)(virtio_base + off) = v; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline void ioapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)IOAPIC_BASE = reg;
	*(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* The LAPIC timer at ``vector`` every ``count`` bus cycles (KVM's bus: 1 GHz). */
static inline void lapic_periodic(u32 vector, u32 count)
{
	lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | vector);
	lapic_write(LAPIC_TIMER_INIT, count);
}

/* Whether the registers at virtio_base are a version 2 device ``device_id``. */
static inline int virtio_is(u32 device_id)
{
	return rd(R_MAGIC) == 0x74726976 && rd(R_VERSION) == 2 && rd(R_DEVICE_ID) == device_id;
}

/* The slot-th device slot's device: virtio_base set to it, its interrupt routed
 * to this CPU at ``vector`` (edge, active high). */
static inline void virtio_use_slot(u32 slot, u32 vector)
{
	static const u8 slot_irq[VIRTIO_MMIO_SLOTS] = {5, 6, 7, 10, 11, 14, 15};
	virtio_base = VIRTIO_MMIO_BASE + slot * 0x1000;
	u32 apic_id = *(volatile u32 *)(LAPIC_BASE + LAPIC_ID) >> 24;
	ioapic_write(IOAPIC_REDTBL(slot_irq[slot]) + 1, apic_id << 24);
	ioapic_write(IOAPIC_REDTBL(slot_irq[slot]), vector);
}

/* The nth (from 0) device ``device_id`` in the slots, used (virtio_use_slot);
 * 0 when there is none. */
static inline int virtio_find(u32 device_id, u32 nth, u32 vector)
{
	for (u32 i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
		virtio_base = VIRTIO_MMIO_BASE + i * 0x1000;
		if (virtio_is(device_id) && nth-- == 0) {
			virtio_use_slot(i, vector);
			return 1;
		}
	}
	return 0;
}

/* Reset, then ACKNOWLEDGE and DRIVER: the device's features may be read. */
static inline void virtio_begin(void)
{
	wr(R_STATUS, 0);
	wr(R_STATUS, S_ACKNOWLEDGE);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
}

/* Feature bits 32 * word .. 32 * word + 31 that the device offers. */
static inline u32 virtio_offered(u32 word)
{
	wr(R_DEVICE_FEATURES_SEL, word);
	return rd(R_DEVICE_FEATURES);
}

/* Accept VIRTIO_F_VERSION_1 and ``low`` (bits 0-31), then FEATURES_OK. */
static inline const char *virtio_accept(u32 low)
{
	if (!(virtio_offered(1) & 1))
		return "no VIRTIO_F_VERSION_1";
	wr(R_DRIVER_FEATURES_SEL, 0);
	wr(R_DRIVER_FEATURES, low);
	wr(R_DRIVER_FEATURES_SEL, 1);
	wr(R_DRIVER_FEATURES, 1);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd(R_STATUS) & S_FEATURES_OK))
		return "FEATURES_OK refused";
	return 0;
}

/* Queue ``index`` of QSIZE entries in ``q``, ready. */
static inline const char *virtio_setup_queue(u32 index, struct ring *q)
{
	wr(R_QUEUE_SEL, index);
	if (rd(R_QUEUE_NUM_MAX) < QSIZE)
		return "queue too small";
	wr(R_QUEUE_NUM, QSIZE);
	wr(R_QUEUE_DESC, (u32)(u64)q->desc);
	wr(R_QUEUE_DESC + 4, 0);
	wr(R_QUEUE_DRIVER, (u32)(u64)&q->avail_flags);
	wr(R_QUEUE_DRIVER + 4, 0);
	wr(R_QUEUE_DEVICE, (u32)(u64)&q->used_flags);
	wr(R_QUEUE_DEVICE + 4, 0);
	wr(R_QUEUE_READY, 1);
	return 0;
}

/* DRIVER_OK: the device is live. */
static inline void virtio_driver_ok(void)
{
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Acknowledge whatever the device's interrupt status says. */
static inline void virtio_ack(void)
{
	u32 isr = rd(R_INTERRUPT_STATUS);
	if (isr)
		wr(R_INTERRUPT_ACK, isr);
}

/* Give a receive queue all its QSIZE buffers of ``size`` bytes at ``bufs``. */
static inline void virtio_fill_rx(struct ring *q, u8 *bufs, u32 size)
{
	for (u16 i = 0; i < QSIZE; i++) {
		q->desc[i] = (struct desc){(u64)(bufs + i * size), size, F_WRITE, 0};
		q->avail_ring[i] = i;
	}
	mb();
	q->avail_idx = QSIZE;
}

#endif
