/* Writes one byte to each address of the table at rsi (rcx entries), then signals on
 * port 0x502 and exits via port 0x501. Uses no stack and writes nothing else. */
	.code64
	.text
	.globl _start
_start:
1:	mov	(%rsi), %rdi
	movb	$0xa5, (%rdi)
	add	$8, %rsi
	dec	%rcx
	jnz	1b
	mov	$0x502, %dx
	outb	%al, %dx
	mov	$0x501, %dx
	outb	%al, %dx
2:	jmp	2b
