// The package version, read once from package.json.
// eslint-disable-next-line @typescript-eslint/no-var-requires
export const TERN_VERSION: string = require('../../package.json').version;
