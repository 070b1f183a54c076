/*
 * kvm_floor: the smallest VMM that runs the osvmm bare-metal guests, in C,
 * straight on /dev/kvm. It is the "floor" of the exit-cost benchmarks: what
 * a port-I/O exit costs with no Python and no device model in the way.
 *
 *   kvm_floor IMAGE [CMDLINE]
 *
 * IMAGE is an ELF. With a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) it is entered
 * in 32-bit protected mode, paging off, %ebx = hvm_start_info at 0x6000;
 * without one, by the osvmm 64-bit entry convention (long mode, identity map
 * of 4 GiB with 2 MiB pages, CS=0x10, DS=ES=SS=0x18, RSP=0x8ff0, RBX=0x6000).
 * 64 MiB of RAM; the command line is at 0x20000. KVM_FLOOR_CPUS=N in the
 * environment makes N vCPUs (default 1): vCPU 0 starts at the entry, the
 * others wait in the in-kernel LAPIC for INIT/SIPI, each on its own thread.
 *
 * Port I/O: out 0x3f8 writes the byte to stdout; in 0x3fd (LSR) reads 0x60;
 * out 0xf4 exits with status (V << 1) | 1 like QEMU's isa-debug-exit; other
 * ports are ignored and read 0xff. HLT or a shutdown (triple fault) exits 4
 * with a message on stderr; so does any other exit reason.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM_SIZE (64UL << 20)
#define START_INFO_ADDR 0x6000
#define MEMMAP_ADDR 0x6040
#define CMDLINE_ADDR 0x20000
#define CMDLINE_MAX 0x10000
#define EBDA_START 0x9fc00
#define HIGH_MEM 0x100000
#define TSS_ADDR 0xfffbd000
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578
/* 64-bit entry convention */
#define GDT_ADDR 0x500
#define IDT_ADDR 0x520
#define BOOT_STACK 0x8ff0
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xa000
#define PD_ADDR 0xb000

#define EXIT_FAULT 4
#define EXIT_USAGE 2

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};
struct hvm_memmap_table_entry {
	uint64_t addr, size;
	uint32_t type, reserved;
};
_Static_assert(sizeof(struct hvm_start_info) == 56, "hvm_start_info");
_Static_assert(sizeof(struct hvm_memmap_table_entry) == 24, "memmap entry");

static uint8_t *mem;

static void die(int status, const char *fmt, const char *arg)
{
	fflush(stdout);
	fprintf(stderr, "kvm_floor: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(status);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *name)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		die(6, "%s failed", name);
	return r;
}

/* Load the PT_LOAD segments at p_paddr; return the PVH entry, or 0 if no note. */
static uint64_t load_elf(const char *path, uint64_t *e_entry)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(EXIT_USAGE, "cannot open %s", path);
	uint8_t *f = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (f == MAP_FAILED || (size_t)st.st_size < sizeof(Elf64_Ehdr))
		die(EXIT_USAGE, "%s: not an ELF file", path);
	Elf64_Ehdr *eh = (Elf64_Ehdr *)f;
	if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh->e_phentsize != sizeof(Elf64_Phdr) ||
	    eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size)
		die(EXIT_USAGE, "%s: not an ELF64 file", path);
	*e_entry = eh->e_entry;
	uint64_t pvh = 0;
	Elf64_Phdr *ph = (Elf64_Phdr *)(f + eh->e_phoff);
	for (int i = 0; i < eh->e_phnum; i++) {
		if (ph[i].p_offset + ph[i].p_filesz > (uint64_t)st.st_size)
			die(EXIT_USAGE, "%s: segment outside the file", path);
		if (ph[i].p_type == PT_LOAD) {
			if (ph[i].p_paddr < HIGH_MEM || ph[i].p_paddr + ph[i].p_memsz > MEM_SIZE ||
			    ph[i].p_filesz > ph[i].p_memsz)
				die(EXIT_USAGE, "%s: segment outside 1 MiB..64 MiB", path);
			memcpy(mem + ph[i].p_paddr, f + ph[i].p_offset, ph[i].p_filesz);
			memset(mem + ph[i].p_paddr + ph[i].p_filesz, 0, ph[i].p_memsz - ph[i].p_filesz);
		} else if (ph[i].p_type == PT_NOTE) {
			uint64_t off = ph[i].p_offset, end = off + ph[i].p_filesz;
			while (off + 12 <= end) {
				uint32_t *n = (uint32_t *)(f + off);
				uint64_t name = off + 12, desc = name + ((n[0] + 3) & ~3u);
				uint64_t next = desc + ((n[1] + 3) & ~3u);
				if (next > end)
					break;
				if (n[2] == XEN_ELFNOTE_PHYS32_ENTRY && n[0] == 4 &&
				    !memcmp(f + name, "Xen", 4)) {
					if (n[1] == 4)
						pvh = *(uint32_t *)(f + desc);
					else if (n[1] == 8)
						pvh = *(uint64_t *)(f + desc);
				}
				off = next;
			}
		}
	}
	munmap(f, st.st_size);
	close(fd);
	return pvh;
}

static void write_start_info(const char *cmdline)
{
	struct hvm_start_info *si = (void *)(mem + START_INFO_ADDR);
	struct hvm_memmap_table_entry *mm = (void *)(mem + MEMMAP_ADDR);
	size_t len = strlen(cmdline);
	if (len >= CMDLINE_MAX)
		die(EXIT_USAGE, "command line longer than %s bytes", "65535");
	memcpy(mem + CMDLINE_ADDR, cmdline, len + 1);
	mm[0] = (struct hvm_memmap_table_entry){0, EBDA_START, 1, 0};
	mm[1] = (struct hvm_memmap_table_entry){HIGH_MEM, MEM_SIZE - HIGH_MEM, 1, 0};
	*si = (struct hvm_start_info){
		.magic = HVM_START_MAGIC,
		.version = 1,
		.cmdline_paddr = CMDLINE_ADDR,
		.memmap_paddr = MEMMAP_ADDR,
		.memmap_entries = 2,
	};
}

static void set_cpuid(int kvm, int vcpu, int id)
{
	int n = 128;
	for (;;) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));
		c->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			for (uint32_t i = 0; i < c->nent; i++)
				if (c->entries[i].function == 1) /* initial APIC ID */
					c->entries[i].ebx =
					    (c->entries[i].ebx & 0x00ffffff) | ((uint32_t)id << 24);
			xioctl(vcpu, KVM_SET_CPUID2, c, "KVM_SET_CPUID2");
			free(c);
			return;
		}
		free(c);
		if (errno != E2BIG || n > 4096)
			die(6, "%s failed", "KVM_GET_SUPPORTED_CPUID");
		n *= 2;
	}
}

static struct kvm_segment seg(uint16_t sel, uint8_t type, int l)
{
	return (struct kvm_segment){
		.base = 0,
		.limit = 0xffffffff,
		.selector = sel,
		.type = type,
		.present = 1,
		.s = 1,
		.db = !l,
		.l = l,
		.g = 1,
	};
}

static void setup_regs(int vcpu, uint64_t pvh, uint64_t e_entry)
{
	struct kvm_sregs s;
	struct kvm_regs r;
	xioctl(vcpu, KVM_GET_SREGS, &s, "KVM_GET_SREGS");
	memset(&r, 0, sizeof(r));
	r.rflags = 2;
	r.rbx = START_INFO_ADDR;
	if (pvh) {
		s.cs = seg(0x08, 0xb, 0);
		s.ds = s.es = s.fs = s.gs = s.ss = seg(0x10, 0x3, 0);
		s.cr0 = 0x11; /* PE | ET */
		s.cr4 = 0;
		s.efer = 0;
		r.rip = pvh;
	} else {
		/* The osvmm 64-bit entry: GDT, empty IDT, identity map of 4 GiB. */
		uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
		gdt[0] = gdt[1] = 0;
		gdt[2] = 0x00af9b000000ffff; /* 0x10 code, 64-bit */
		gdt[3] = 0x00cf93000000ffff; /* 0x18 data */
		uint64_t *pml4 = (uint64_t *)(mem + PML4_ADDR);
		uint64_t *pdpt = (uint64_t *)(mem + PDPT_ADDR);
		uint64_t *pd = (uint64_t *)(mem + PD_ADDR);
		pml4[0] = PDPT_ADDR | 3;
		for (int i = 0; i < 4; i++)
			pdpt[i] = (PD_ADDR + 0x1000 * i) | 3;
		for (uint64_t i = 0; i < 2048; i++)
			pd[i] = (i << 21) | 0x83; /* P | RW | PS */
		s.gdt.base = GDT_ADDR;
		s.gdt.limit = 4 * 8 - 1;
		s.idt.base = IDT_ADDR;
		s.idt.limit = 0;
		s.cs = seg(0x10, 0xb, 1);
		s.ds = s.es = s.fs = s.gs = s.ss = seg(0x18, 0x3, 0);
		s.cr3 = PML4_ADDR;
		s.cr4 = 0x20;		/* PAE */
		s.cr0 = 0x80000011;	/* PG | ET | PE */
		s.efer = 0x500;		/* LMA | LME */
		r.rip = e_entry;
		r.rsp = BOOT_STACK;
	}
	xioctl(vcpu, KVM_SET_SREGS, &s, "KVM_SET_SREGS");
	xioctl(vcpu, KVM_SET_REGS, &r, "KVM_SET_REGS");
}

static int run_size;

/* The exit loop of one vCPU; any vCPU's exit decision ends the process. */
static void *run_vcpu(void *arg)
{
	int vcpu = (int)(intptr_t)arg;
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die(6, "%s failed", "mmap of kvm_run");
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die(6, "KVM_RUN failed: %s", strerror(errno));
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			uint16_t port = run->io.port;
			for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
				if (run->io.direction == KVM_EXIT_IO_OUT) {
					if (port == 0x3f8)
						putchar(data[0]);
					else if (port == 0xf4) {
						fflush(stdout);
						exit((data[0] << 1) | 1);
					}
				} else {
					memset(data, 0xff, run->io.size);
					if (port == 0x3fd)
						data[0] = 0x60; /* THRE | TEMT */
				}
			}
			break;
		}
		case KVM_EXIT_HLT:
			die(EXIT_FAULT, "guest halted%s", "");
			break;
		case KVM_EXIT_SHUTDOWN:
			die(EXIT_FAULT, "guest shut down (triple fault)%s", "");
			break;
		default: {
			char reason[32];
			snprintf(reason, sizeof(reason), "%u", run->exit_reason);
			die(EXIT_FAULT, "unexpected exit reason %s", reason);
		}
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: kvm_floor IMAGE [CMDLINE]\n");
		return EXIT_USAGE;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die(EXIT_USAGE, "cannot open /dev/kvm: %s", strerror(errno));
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die(6, "%s failed", "KVM_CREATE_VM");
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		   -1, 0);
	if (mem == MAP_FAILED)
		die(6, "%s failed", "mmap of guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem};
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
	if (ioctl(vm, KVM_SET_TSS_ADDR, (unsigned long)TSS_ADDR) < 0)
		die(6, "%s failed", "KVM_SET_TSS_ADDR");
	xioctl(vm, KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP");
	struct kvm_pit_config pit = {.flags = 0};
	xioctl(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");

	uint64_t e_entry;
	uint64_t pvh = load_elf(argv[1], &e_entry);
	write_start_info(argc > 2 ? argv[2] : "");

	const char *ncpus_env = getenv("KVM_FLOOR_CPUS");
	int ncpus = ncpus_env ? atoi(ncpus_env) : 1;
	if (ncpus < 1 || ncpus > 64)
		die(EXIT_USAGE, "KVM_FLOOR_CPUS must be 1..64, not %s", ncpus_env);
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	int vcpus[64];
	for (int i = 0; i < ncpus; i++) {
		vcpus[i] = ioctl(vm, KVM_CREATE_VCPU, (unsigned long)i);
		if (vcpus[i] < 0)
			die(6, "%s failed", "KVM_CREATE_VCPU");
		set_cpuid(kvm, vcpus[i], i);
	}
	setup_regs(vcpus[0], pvh, e_entry);
	for (int i = 1; i < ncpus; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, run_vcpu, (void *)(intptr_t)vcpus[i]))
			die(6, "%s failed", "pthread_create");
	}
	run_vcpu((void *)(intptr_t)vcpus[0]);
	return 0;
}
