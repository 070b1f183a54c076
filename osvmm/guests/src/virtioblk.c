/*
 * virtioblk: a virtio-blk driver at CPL0, as small as one can be, on the first
 * virtio-mmio device (0xc0000000, ISA IRQ 5 on I/O APIC pin 5; the VMM's
 * devices/virtio/mmio.py slot 0).
 *   - probes the transport (magic, version 2, device 2), negotiates
 *     VIRTIO_F_VERSION_1 only, sets up queue 0 (8 entries) and DRIVER_OK;
 *   - GET_ID, then reads sector 0, writes sector 1 with a pattern, flushes,
 *     reads sector 1 back and compares; with rw=0 (a read-only disk) the
 *     write must come back VIRTIO_BLK_S_IOERR instead;
 *   - each request: QueueNotify (a 4-byte store: the VMM's ioeventfd), then
 *     hlt until the used ring has it; the interrupt (the VMM's irqfd on pin 5)
 *     wakes the CPU and is acknowledged through InterruptStatus/Ack.
 *   - with rounds=N (0 unless given), then N rounds each writing sector
 *     2 + r % (capacity - 2) with round r's pattern (r in its first 8 bytes)
 *     and reading it back, "virtioblk: round R ok" every 50 rounds and
 *     "virtioblk: rounds N done" at the end (the snapshot tests stop and
 *     resume it in the middle);
 * Prints "virtioblk: id <id>", "virtioblk: sector 0 <first 16 bytes>",
 * "virtioblk: write <status>", "virtioblk: readback ok" (or "differs"),
 * "virtioblk: interrupts N requests M" and exits 0; a failed step prints
 * "virtioblk: FAIL <what>" and exits EXIT_FAIL.
 */
#include "hypercall.h"

#define VIRTIO_VECTOR 0x50
#define QSIZE 8
#include "virtio_mmio.h"


#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

struct req {
	u32 type, reserved;
	u64 sector;
};

static struct ring q;
static struct req hdr;
static u8 data[512] __attribute__((aligned(16)));
static u8 status;
static u16 seen_used;
static u64 interrupts;
static u64 requests;

static NORETURN void fail(const char *what)
{
	rt_printf("virtioblk: FAIL %s\n", what);
	rt_exit(EXIT_FAIL);
}

/* One request: header, data (len bytes, device-writable if in), status. */
static u8 request(u32 type, u64 sector, u32 len, int in)
{
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xee;
	q.desc[0] = (struct desc){(u64)&hdr, sizeof(hdr), F_NEXT, 1};
	if (len) {
		q.desc[1] = (struct desc){(u64)data, len, F_NEXT | (in ? F_WRITE : 0), 2};
	} else {
		q.desc[0].next = 2;
	}
	q.desc[2] = (struct desc){(u64)&status, 1, F_WRITE, 0};
	q.avail_ring[q.avail_idx % QSIZE] = 0;
	__asm__ volatile("" ::: "memory");
	q.avail_idx++;
	mb();
	wr(R_QUEUE_NOTIFY, 0); /* a 4-byte store of the queue index: the ioeventfd */
	requests++;
	u64 budget = rdtsc() + 20000000000UL;
	while (*(volatile u16 *)&q.used_idx == seen_used) {
		if (rdtsc() > budget)
			fail("no answer from the device");
		__asm__ volatile("sti; hlt; cli" ::: "memory"); /* woken by the interrupt */
	}
	seen_used++;
	virtio_ack();
	return status;
}

int guest_main(void)
{
	int rw = (int)rt_arg_u64("rw", 1);
	hc_irq_setup();
	virtio_use_slot(0, VIRTIO_VECTOR);
	if (!virtio_is(2))
		fail("no virtio-mmio version 2 block device at 0xc0000000");
	virtio_begin();
	const char *err = virtio_accept(0);
	if (!err)
		err = virtio_setup_queue(0, &q);
	if (err)
		fail(err);
	virtio_driver_ok();
	/* Counted by the doorbell handler from here on. */
	u64 irq_base = hc_irq_count;

	if (request(T_GET_ID, 0, 20, 1) != 0)
		fail("GET_ID");
	data[20] = 0;
	rt_printf("virtioblk: id %s\n", (const char *)data);
	u64 capacity = *(volatile u64 *)(virtio_base + R_CONFIG);
	if (capacity < 2)
		fail("capacity under 2 sectors");
	if (request(T_IN, 0, 512, 1) != 0)
		fail("read sector 0");
	data[16] = 0;
	rt_printf("virtioblk: sector 0 %s\n", (const char *)data);
	for (int i = 0; i < 512; i++)
		data[i] = (u8)(i * 7 + 3);
	u8 st = request(T_OUT, 1, 512, 0);
	rt_printf("virtioblk: write %u\n", st);
	if (request(T_FLUSH, 0, 0, 0) != 0)
		fail("flush");
	memset(data, 0, sizeof(data));
	if (request(T_IN, 1, 512, 1) != 0)
		fail("read sector 1");
	int same = 1;
	for (int i = 0; i < 512; i++)
		if (data[i] != (u8)(i * 7 + 3))
			same = 0;
	if (rw)
		rt_printf("virtioblk: readback %s\n", same ? "ok" : "differs");
	else
		rt_printf("virtioblk: readback %s\n", same ? "written" : "unchanged");
	/* Out of range: IOERR, and the device goes on. */
	if (request(T_IN, capacity, 512, 1) != 1)
		fail("a read past the end was not IOERR");
	u64 rounds = rt_arg_u64("rounds", 0);
	if (rounds && capacity < 3)
		fail("rounds: capacity under 3 sectors");
	for (u64 r = 0; r < rounds; r++) {
		u64 sector = 2 + r % (capacity - 2);
		for (int i = 0; i < 512; i++)
			data[i] = (u8)(r * 13 + i);
		*(u64 *)data = r;
		if (request(T_OUT, sector, 512, 0) != 0)
			fail("round write");
		memset(data, 0, sizeof(data));
		if (request(T_IN, sector, 512, 1) != 0)
			fail("round read");
		if (*(u64 *)data != r)
			fail("round readback: another round's sector");
		for (int i = 8; i < 512; i++)
			if (data[i] != (u8)(r * 13 + i))
				fail("round readback differs");
		if ((r + 1) % 50 == 0)
			rt_printf("virtioblk: round %lu ok\n", r + 1);
	}
	if (rounds)
		rt_printf("virtioblk: rounds %lu done\n", rounds);
	__asm__ volatile("sti; nop; cli" ::: "memory"); /* an interrupt still pending */
	interrupts = hc_irq_count - irq_base;
	rt_printf("virtioblk: interrupts %lu requests %lu\n", interrupts, requests);
	return EXIT_OK;
}
