/* MMIO to 0xd0000000, which the page tables map but no memory slot backs. Reads are
 * echoed to port 0x515 (outl), 8-byte reads as low then high half. */
	.code64
	.text
	.globl _start
_start:
	mov	$0xd0000000, %ebx
	movl	$0xcafef00d, (%rbx)
	movb	$0x5a, 0x10(%rbx)
	movabs	$0x0123456789abcdef, %rax
	mov	%rax, 0x20(%rbx)
	mov	$0x515, %dx
	movl	0x4(%rbx), %eax
	outl	%eax, %dx
	movzwl	0x30(%rbx), %eax
	outl	%eax, %dx
	mov	0x8(%rbx), %rax
	outl	%eax, %dx
	shr	$32, %rax
	outl	%eax, %dx
	mov	$0x501, %dx
	outb	%al, %dx
1:	jmp	1b
