// Preloaded into a child process (node --import): it runs as on another machine sharing the folder
// (os.hostname() answers OTHER_HOST), as a fit partition on a second machine or in a container does.

import { syncBuiltinESMExports } from 'node:module';
import os from 'node:os';

const name = process.env.OTHER_HOST ?? 'another-machine';
os.hostname = () => name;
syncBuiltinESMExports();
