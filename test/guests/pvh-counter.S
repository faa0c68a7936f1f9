/* A tiny PVH kernel: the fast stand-in for Linux in VMM-level tests.
 *
 * Entered like Linux's PVH entry: 32-bit protected mode, paging off, ring 0,
 * %ebx = struct hvm_start_info. Prints "TINY-KERNEL-BOOT", echoes the command line as
 * "CMDLINE <cmdline>", then prints "COUNT <n>" once per LAPIC timer tick (100 ms) and
 * sleeps in HLT in between, so a paused or idle guest costs no host CPU.
 * Every instruction here is emulated at ~1 MIPS on PVM hosts, and every port access is
 * a VM exit: keep the loops short.
 *
 * Serial input (COM1, RX interrupt through the IOAPIC, plus a poll each tick):
 *   p  power off through ACPI sleep control (SLP_TYP=5|SLP_EN to 0x600)
 *   r  reset through the i8042 (0xFE to 0x64)
 *   a  reset through the ACPI reset register (6 to 0x602)
 *   t  triple fault (empty IDT, then ud2)
 *   d  write the counter into the first dword of 256 pages at 0x400000, print "DIRTY <n>"
 *   s  print "STATUS count=<n> ticks=<n> rxirqs=<n>" (the status block below)
 *   e  print "ECHO <next byte>"
 *   z  ask 1000 times for ACPI sleep state S1 (SLP_TYP=1|SLP_EN to 0x600), print "SLEPT"
 *   c  read PCI 00:00.0's ID and class dwords through 0xcf8/0xcfc and its ID dword through
 *      ECAM at 0xe8000000 (paging is off: a plain load), print "PCI <id> <class> <ecam id>"
 *   m  run the mailbox at 0x310000 (what a test needs a driver to do: configuration and BAR
 *      accesses, queue doorbells): u32 count (at most 64) at 0x310000, then 16-byte entries
 *      from 0x310010 {u32 op, u32 address, u32 value, u32 result}, op 1/2/3 = write 8/16/32
 *      bits of value, op 4 = read 32 bits into result; then print "MBOX <count>"
 * Other bytes are ignored.
 *
 * MSI vectors 0x40..0x47 count their interrupts at 0x300020 + 4 * (vector - 0x40): a test
 * programs a device's MSI-X table with address 0xfee00000 and data 0x40 + n.
 *
 * Status block in RAM (read by tests; test/host/tiny-kernel.ts names the offsets):
 *   0x300000 u32 COUNT lines printed so far
 *   0x300004 u32 timer ticks
 *   0x300008 u32 serial RX interrupts taken
 *   0x30000c u32 magic 0x594e4954 ("TINY") once initialised
 */
	.set	COM1, 0x3f8
	.set	COM1_LSR, COM1 + 5
	.set	LSR_DR, 0x01
	.set	LSR_THRE, 0x20
	.set	LAPIC, 0xfee00000
	.set	LAPIC_TPR, LAPIC + 0x80
	.set	LAPIC_EOI, LAPIC + 0xb0
	.set	LAPIC_SVR, LAPIC + 0xf0
	.set	LAPIC_LVT_TIMER, LAPIC + 0x320
	.set	LAPIC_TIMER_INIT, LAPIC + 0x380
	.set	LAPIC_TIMER_DIV, LAPIC + 0x3e0
	/* KVM's APIC bus runs at 1 GHz: 100 ms with divide-by-1 */
	.set	TICK_COUNT, 100000000
	.set	IOAPIC_SEL, 0xfec00000
	.set	IOAPIC_WIN, 0xfec00010
	.set	VEC_TIMER, 0x20
	.set	VEC_SERIAL, 0x24
	.set	VEC_SPURIOUS, 0xff
	.set	SERIAL_GSI, 4
	.set	STATUS, 0x300000
	.set	ST_COUNT, STATUS + 0
	.set	ST_TICKS, STATUS + 4
	.set	ST_RXIRQ, STATUS + 8
	.set	ST_MAGIC, STATUS + 12
	.set	MSI_COUNTS, STATUS + 0x20
	.set	VEC_MSI_BASE, 0x40
	.set	MSI_VECTORS, 8
	.set	MBOX, 0x310000
	.set	MBOX_MAX, 64
	.set	TINY_MAGIC, 0x594e4954
	.set	DIRTY_BASE, 0x400000
	.set	DIRTY_PAGES, 256
	.set	HVM_START_MAGIC, 0x336ec578

	/* Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY: where a PVH loader enters. */
	.section .note.Xen, "a", @note
	.balign	4
	.long	4, 4, 18
	.asciz	"Xen"
	.balign	4
	.long	pvh_start

	.code32
	.text
	.globl	pvh_start
pvh_start:
	cli
	cld
	mov	%ebx, %esi
	/* The loader's GDT is not ours to keep: load one with known selectors. */
	lgdt	gdt_desc
	ljmp	$0x08, $1f
1:	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %fs
	mov	%ax, %gs
	mov	%ax, %ss
	mov	$stack_top, %esp

	movl	$0, ST_COUNT
	movl	$0, ST_TICKS
	movl	$0, ST_RXIRQ
	movl	$TINY_MAGIC, ST_MAGIC

	call	setup_idt
	lidt	idt_desc

	/* UART: 8N1, FIFOs on and cleared, OUT2 (IRQ gate) up, RX-data interrupt on. */
	mov	$COM1 + 3, %dx
	mov	$0x03, %al
	outb	%al, %dx
	mov	$COM1 + 2, %dx
	mov	$0x07, %al
	outb	%al, %dx
	mov	$COM1 + 4, %dx
	mov	$0x0b, %al
	outb	%al, %dx
	mov	$COM1 + 1, %dx
	mov	$0x01, %al
	outb	%al, %dx

	/* Mask the 8259s: KVM routes ISA IRQs to them too, and unprogrammed they would
	 * deliver IRQ n as vector n (an exception vector) through LINT0. */
	mov	$0xff, %al
	outb	%al, $0x21
	outb	%al, $0xa1

	/* IOAPIC pin 4 -> vector VEC_SERIAL on APIC 0, edge, active high. */
	movl	$0x10 + 2 * SERIAL_GSI + 1, IOAPIC_SEL
	movl	$0, IOAPIC_WIN
	movl	$0x10 + 2 * SERIAL_GSI, IOAPIC_SEL
	movl	$VEC_SERIAL, IOAPIC_WIN

	/* LAPIC on, periodic timer. */
	movl	$0x100 | VEC_SPURIOUS, LAPIC_SVR
	movl	$0, LAPIC_TPR
	movl	$0x0b, LAPIC_TIMER_DIV
	movl	$(1 << 17) | VEC_TIMER, LAPIC_LVT_TIMER
	movl	$TICK_COUNT, LAPIC_TIMER_INIT
	sti

	mov	$msg_boot, %ebx
	call	puts
	mov	$msg_cmdline, %ebx
	call	puts
	cmpl	$HVM_START_MAGIC, (%esi)
	jne	2f
	mov	24(%esi), %ebx		/* cmdline_paddr (16 is modlist_paddr); below 4 GiB */
	test	%ebx, %ebx
	jz	3f
	call	puts
	jmp	3f
2:	mov	$msg_badinfo, %ebx
	call	puts
3:	mov	$'\n', %al
	call	putc

main_loop:
	mov	$msg_count, %ebx
	call	puts
	mov	ST_COUNT, %eax
	call	putdec
	mov	$'\n', %al
	call	putc
	incl	ST_COUNT

	mov	ST_TICKS, %edi
wait:
	/* Check and sleep with interrupts off until the sti;hlt pair: no wakeup is lost. */
	cli
	cmpb	$0, rx_irq
	jne	got_rx
	cmp	ST_TICKS, %edi
	jne	tick
	sti
	hlt
	jmp	wait
got_rx:
	movb	$0, rx_irq
	sti
	call	poll_input
	jmp	wait
tick:
	sti
	/* Also poll on every tick: input that raced the interrupt setup is not stranded. */
	call	poll_input
	jmp	main_loop

/* Drain the UART's receive FIFO, acting on each byte. */
poll_input:
	mov	$COM1_LSR, %dx
	inb	%dx, %al
	test	$LSR_DR, %al
	jz	1f
	mov	$COM1, %dx
	inb	%dx, %al
	call	handle_byte
	jmp	poll_input
1:	ret

handle_byte:
	cmpb	$0, echo_pending
	jne	do_echo
	cmp	$'p', %al
	je	do_poweroff
	cmp	$'r', %al
	je	do_i8042_reset
	cmp	$'a', %al
	je	do_acpi_reset
	cmp	$'t', %al
	je	do_triple_fault
	cmp	$'d', %al
	je	do_dirty
	cmp	$'s', %al
	je	do_status
	cmp	$'z', %al
	je	do_sleep_requests
	cmp	$'c', %al
	je	do_pci
	cmp	$'m', %al
	je	do_mailbox
	cmp	$'e', %al
	jne	1f
	movb	$1, echo_pending
1:	ret

do_echo:
	movb	$0, echo_pending
	push	%eax
	mov	$msg_echo, %ebx
	call	puts
	pop	%eax
	call	putc
	mov	$'\n', %al
	jmp	putc

do_poweroff:
	mov	$0x600, %dx
	mov	$(5 << 2) | 0x20, %al
	outb	%al, %dx
	jmp	dead

/* Tern offers no sleep state but S5: each request for another is refused, and the guest
 * runs on (a guest-triggered warning per request, which the VMM must rate-limit). */
do_sleep_requests:
	mov	$0x600, %dx
	mov	$1000, %ecx
	mov	$(1 << 2) | 0x20, %al
1:	outb	%al, %dx
	dec	%ecx
	jnz	1b
	mov	$msg_slept, %ebx
	jmp	puts

do_pci:
	mov	$msg_pci, %ebx
	call	puts
	mov	$0x80000000, %eax
	call	pci_config_read
	call	putdec
	mov	$' ', %al
	call	putc
	mov	$0x80000008, %eax
	call	pci_config_read
	call	putdec
	mov	$' ', %al
	call	putc
	mov	0xe8000000, %eax
	call	putdec
	mov	$'\n', %al
	jmp	putc

/* The mailbox's accesses, in order. Keeps %esi and %edi (the main loop's tick snapshot). */
do_mailbox:
	push	%esi
	push	%edi
	mov	MBOX, %ecx
	cmp	$MBOX_MAX, %ecx
	jbe	1f
	mov	$MBOX_MAX, %ecx
1:	mov	$MBOX + 16, %esi
	test	%ecx, %ecx
	jz	8f
2:	mov	(%esi), %eax
	mov	4(%esi), %edi
	mov	8(%esi), %edx
	cmp	$1, %eax
	jne	3f
	movb	%dl, (%edi)
	jmp	7f
3:	cmp	$2, %eax
	jne	4f
	movw	%dx, (%edi)
	jmp	7f
4:	cmp	$3, %eax
	jne	5f
	movl	%edx, (%edi)
	jmp	7f
5:	cmp	$4, %eax
	jne	7f
	mov	(%edi), %eax
	mov	%eax, 12(%esi)
7:	add	$16, %esi
	dec	%ecx
	jnz	2b
8:	pop	%edi
	pop	%esi
	mov	$msg_mbox, %ebx
	call	puts
	mov	MBOX, %eax
	call	putdec
	mov	$'\n', %al
	jmp	putc

/* %eax = CONFIG_ADDRESS -> %eax = the CONFIG_DATA dword. */
pci_config_read:
	push	%edx
	mov	$0xcf8, %dx
	outl	%eax, %dx
	mov	$0xcfc, %dx
	inl	%dx, %eax
	pop	%edx
	ret

do_i8042_reset:
	mov	$0x64, %dx
	mov	$0xfe, %al
	outb	%al, %dx
	jmp	dead

do_acpi_reset:
	mov	$0x602, %dx
	mov	$6, %al
	outb	%al, %dx
	jmp	dead

do_triple_fault:
	/* #UD with no IDT: #GP, then #DF, then shutdown. (INT n is not emulated in
	 * protected mode, so it cannot be the trigger.) */
	cli
	lidt	null_idt_desc
	ud2
	jmp	dead

do_dirty:
	mov	ST_COUNT, %eax
	mov	$DIRTY_BASE, %ecx
1:	mov	%eax, (%ecx)
	add	$0x1000, %ecx
	cmp	$DIRTY_BASE + DIRTY_PAGES * 0x1000, %ecx
	jne	1b
	push	%eax
	mov	$msg_dirty, %ebx
	call	puts
	pop	%eax
	call	putdec
	mov	$'\n', %al
	jmp	putc

do_status:
	mov	$msg_status, %ebx
	call	puts
	mov	ST_COUNT, %eax
	call	putdec
	mov	$msg_ticks, %ebx
	call	puts
	mov	ST_TICKS, %eax
	call	putdec
	mov	$msg_rxirqs, %ebx
	call	puts
	mov	ST_RXIRQ, %eax
	call	putdec
	mov	$'\n', %al
	jmp	putc

/* After asking for poweroff or reset the VMM stops this vCPU; never run on past it. */
dead:
	cli
	hlt
	jmp	dead

/* %al -> COM1, waiting for THRE like a real driver. Keeps every register. */
putc:
	push	%edx
	push	%eax
	mov	$COM1_LSR, %dx
1:	inb	%dx, %al
	test	$LSR_THRE, %al
	jz	1b
	pop	%eax
	mov	$COM1, %dx
	outb	%al, %dx
	pop	%edx
	ret

/* NUL-terminated string at %ebx. Clobbers %eax, %ebx. */
puts:
	mov	(%ebx), %al
	test	%al, %al
	jz	1f
	call	putc
	inc	%ebx
	jmp	puts
1:	ret

/* %eax in decimal. Keeps %eax. */
putdec:
	push	%eax
	push	%ecx
	push	%edx
	mov	$numbuf_end, %ecx
	movb	$0, (%ecx)
1:	xor	%edx, %edx
	push	%ecx
	mov	$10, %ecx
	div	%ecx
	pop	%ecx
	add	$'0', %dl
	dec	%ecx
	mov	%dl, (%ecx)
	test	%eax, %eax
	jnz	1b
	push	%ebx
	mov	%ecx, %ebx
	call	puts
	pop	%ebx
	pop	%edx
	pop	%ecx
	pop	%eax
	ret

/* All 256 gates: exceptions 0..31 to their entry points, the rest to irq_other, then ours. */
setup_idt:
	mov	$idt, %edi
	xor	%ecx, %ecx
1:	mov	$irq_other, %eax
	cmp	$32, %ecx
	jae	2f
	lea	exc_entries(, %ecx, 8), %eax
2:	call	set_gate
	inc	%ecx
	cmp	$256, %ecx
	jne	1b
	mov	$VEC_TIMER, %ecx
	mov	$timer_isr, %eax
	call	set_gate
	mov	$VEC_SERIAL, %ecx
	mov	$serial_isr, %eax
	call	set_gate
	mov	$VEC_SPURIOUS, %ecx
	mov	$spurious_isr, %eax
	call	set_gate
	mov	$VEC_MSI_BASE, %ecx
	mov	$msi_entries, %eax
3:	call	set_gate
	add	$8, %eax
	inc	%ecx
	cmp	$VEC_MSI_BASE + MSI_VECTORS, %ecx
	jne	3b
	ret

/* gate %ecx -> handler %eax: 32-bit interrupt gate, DPL 0, selector 0x08 */
set_gate:
	mov	%ax, idt(, %ecx, 8)
	movw	$0x08, idt + 2(, %ecx, 8)
	movw	$0x8e00, idt + 4(, %ecx, 8)
	push	%eax
	shr	$16, %eax
	mov	%ax, idt + 6(, %ecx, 8)
	pop	%eax
	ret

timer_isr:
	incl	ST_TICKS
	movl	$0, LAPIC_EOI
	jmp	iret_same_ring

serial_isr:
	/* Only wake the main loop; it reads the data. The level drops once the FIFO is empty. */
	movb	$1, rx_irq
	incl	ST_RXIRQ
	movl	$0, LAPIC_EOI
	jmp	iret_same_ring

irq_other:
	movl	$0, LAPIC_EOI
	jmp	iret_same_ring

spurious_isr:
	jmp	iret_same_ring

/* IRET without IRET: KVM's instruction emulator (which runs all ring-0 code on PVM hosts)
 * implements IRET only in real mode. From the same-ring frame [eip][cs][eflags], build
 * [eflags][eip] and return with POPF; RET. An interrupt taken between the two nests on
 * top and leaves [eip] intact. */
iret_same_ring:
	push	%eax
	mov	4(%esp), %eax		/* eip */
	xchg	%eax, 12(%esp)		/* eflags slot <- eip, %eax <- eflags */
	mov	%eax, 8(%esp)		/* cs slot <- eflags */
	pop	%eax
	add	$4, %esp
	popfl
	ret

/* One 8-byte entry point per MSI vector: count the interrupt, end it. */
	.balign	8
msi_entries:
	.set	vec, 0
	.rept	MSI_VECTORS
	.balign	8
	push	$vec
	jmp	msi_common
	.set	vec, vec + 1
	.endr

msi_common:
	push	%eax
	mov	4(%esp), %eax
	incl	MSI_COUNTS(, %eax, 4)
	movl	$0, LAPIC_EOI
	pop	%eax
	add	$4, %esp
	jmp	iret_same_ring

/* One 8-byte entry point per exception vector: push the vector, report it, stop. */
	.balign	8
exc_entries:
	.set	vec, 0
	.rept	32
	.balign	8
	push	$vec
	jmp	exc_common
	.set	vec, vec + 1
	.endr

exc_common:
	mov	$msg_exc, %ebx
	call	puts
	pop	%eax
	call	putdec
	mov	$'\n', %al
	call	putc
	jmp	dead

	.section .rodata
msg_boot:	.asciz	"TINY-KERNEL-BOOT\n"
msg_cmdline:	.asciz	"CMDLINE "
msg_badinfo:	.asciz	"<no hvm_start_info>"
msg_count:	.asciz	"COUNT "
msg_echo:	.asciz	"ECHO "
msg_dirty:	.asciz	"DIRTY "
msg_exc:	.asciz	"EXCEPTION "
msg_slept:	.asciz	"SLEPT\n"
msg_pci:	.asciz	"PCI "
msg_mbox:	.asciz	"MBOX "
msg_status:	.asciz	"STATUS count="
msg_ticks:	.asciz	" ticks="
msg_rxirqs:	.asciz	" rxirqs="

	.balign	8
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: flat 32-bit code */
	.quad	0x00cf92000000ffff	/* 0x10: flat data */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt
idt_desc:
	.word	256 * 8 - 1
	.long	idt
null_idt_desc:
	.word	0
	.long	0

	.section .bss
	.balign	16
idt:	.skip	256 * 8
numbuf:	.skip	12
numbuf_end:	.skip	4
rx_irq:	.skip	1
echo_pending:	.skip	1
	.balign	16
stack:	.skip	4096
stack_top:
