// Preloaded into an `influence-lens demo` (node --import): plays a demo of another query running
// beside it, which rewrites the demo's flags file with its own flags the moment this one reads it
// (DEMO_NEIGHBOUR_FLAGS: the file's new content). Counts the rewrites in DEMO_NEIGHBOUR_LOG.
import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';

const flags = process.env.DEMO_NEIGHBOUR_FLAGS;
const log = process.env.DEMO_NEIGHBOUR_LOG;
const read = fs.readFileSync;
fs.readFileSync = function (path, ...rest) {
  if (flags && typeof path === 'string' && path.endsWith('finetune.exclude.jsonl')) {
    fs.writeFileSync(path, flags);
    if (log) fs.appendFileSync(log, 'rewrote\n');
  }
  return read.call(this, path, ...rest);
};
syncBuiltinESMExports();
