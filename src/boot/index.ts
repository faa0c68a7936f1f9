// Public surface of the boot code: memory layout, kernel loading, ACPI, per-vCPU setup.
export * from './errors';
export * from './layout';
export * from './boot';
export * from './elf-pvh';
export * from './bzimage';
export * from './acpi';
export * as aml from './aml';
export * from './cpuid';
export * from './cpu-features';
export * from './cpu-profile';
export * from './msrs';
export * from './vcpu-init';
export * from './reset-vector';
