#!/usr/bin/env node
// `tern` started as a plain script (the launcher starts it from its startup snapshot instead).
import { runTern } from './tern-main';

runTern();
