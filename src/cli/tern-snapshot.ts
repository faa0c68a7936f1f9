// The entry of tern's V8 startup snapshot (`node --build-snapshot`, made by scripts/bundle.js):
// every module of the CLI is loaded and initialised (schemas compiled, slices built) when the
// snapshot is built, so a VMM started from it runs runTern() at once instead of reading,
// compiling and running a megabyte of JavaScript first. Modules that cannot be loaded while a
// snapshot is built (node:http) are loaded when first used; see scripts/bundle.js.
import v8 from 'node:v8';
import { runTern } from './tern-main';

v8.startupSnapshot.setDeserializeMainFunction(() => runTern());
