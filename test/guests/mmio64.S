/* 8-byte MMIO through the VMM's bus: writes 0xfedcba9876543210 to 0xd0000040, reads 8 bytes
 * from 0xd0000048 and echoes them to port 0x515 (outl), low half then high half. */
	.code64
	.text
	.globl _start
_start:
	mov	$0xd0000000, %ebx
	movabs	$0xfedcba9876543210, %rax
	mov	%rax, 0x40(%rbx)
	mov	0x48(%rbx), %rax
	mov	$0x515, %dx
	outl	%eax, %dx
	shr	$32, %rax
	outl	%eax, %dx
	mov	$0x501, %dx
	outb	%al, %dx
1:	jmp	1b
