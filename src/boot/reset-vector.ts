// What sits at the x86 reset vector (F000:FFF0, physical 0xffff0). Tern boots kernels directly
// and has no BIOS, but Linux's last-resort reboot paths (EFI reboot without EFI, "BIOS" reboot)
// drop to real mode and jump there. A firmware would reset the machine; so does this code, by
// writing the ACPI reset register, so every reboot path reaches the VMM.
import { ACPI_RESET_PORT, ACPI_RESET_VALUE } from '../devices/acpi-pm';
import type { GuestMemory, GuestAddress } from '../memory/guest-memory';

export const RESET_VECTOR_ADDRESS: GuestAddress = 0xffff0;

/** 16-bit code: mov dx, port; mov al, value; out dx, al; 1: hlt; jmp 1b */
export function resetVectorCode(port = ACPI_RESET_PORT, value = ACPI_RESET_VALUE): Uint8Array {
  return Uint8Array.of(0xba, port & 0xff, port >> 8, 0xb0, value, 0xee, 0xf4, 0xeb, 0xfd);
}

export function writeResetVector(mem: GuestMemory): void {
  mem.write(RESET_VECTOR_ADDRESS, resetVectorCode());
}
