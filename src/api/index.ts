export * from './schema';
export * from './errors';
export * from './client';
export * from './event-monitor';
export * from './host-file';
export * from './request-body';
export * from './server';
export * from './vmm-api';
