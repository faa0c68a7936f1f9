/* Raises #UD with no IDT loaded: the exception escalates to a triple fault. */
	.code64
	.text
	.globl _start
_start:
	ud2
