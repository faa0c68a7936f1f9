// PCI segment 0: configuration space, functions, MSI-X, and the segment device that routes
// configuration cycles and BAR accesses.
export * from './config-space';
export * from './function';
export * from './host-bridge';
export * from './msix';
export * from './segment';
