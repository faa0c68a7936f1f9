/* Reads a value with in (sizes 1, 2, 4) and writes it back with out of the same size,
 * rcx rounds of each, then exits via port 0x501. */
	.code64
	.text
	.globl _start
_start:
	mov	$4, %ecx
1:	mov	$0x510, %dx
	inb	%dx, %al
	mov	$0x511, %dx
	outb	%al, %dx
	mov	$0x512, %dx
	inw	%dx, %ax
	mov	$0x513, %dx
	outw	%ax, %dx
	mov	$0x514, %dx
	inl	%dx, %eax
	mov	$0x515, %dx
	outl	%eax, %dx
	dec	%ecx
	jnz	1b
	mov	$0x501, %dx
	outb	%al, %dx
2:	jmp	2b
