// Shared by the asset builders (build-default.mjs, build-nonlex.mjs): running the project's
// own CLI step by step, and listing what was built with its sha256 (compared with the
// shipped files under --check).
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';

/** A `cli(label, args, stdoutFile?)` that runs `src/server/cli.ts` with its cache in `cache`, exits on failure, returns seconds. */
export function cliRunner(cache) {
  return (label, args, stdoutFile) => {
    const t0 = Date.now();
    process.stderr.write(`\n== ${label}\n`);
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...args.map(String)], {
      stdio: ['ignore', stdoutFile ? 'pipe' : 'inherit', 'inherit'],
      env: { ...process.env, INFLUENCE_LENS_CACHE: cache },
      maxBuffer: 1 << 28,
    });
    if (r.status !== 0) {
      process.stderr.write(`${label} failed (exit ${r.status})\n`);
      process.exit(1);
    }
    if (stdoutFile) writeFileSync(stdoutFile, r.stdout);
    const s = (Date.now() - t0) / 1000;
    process.stderr.write(`== ${label}: ${s.toFixed(1)} s\n`);
    return s;
  };
}

/**
 * Prints sha256 and path of every built file under `out` (data/, pretrained/, finetuned/ and
 * eval.json; READMEs are written by hand), marking under `check` whether each equals the
 * shipped one. Returns the byte count, file count and number of mismatches.
 */
export function listBuilt(out, shipped, check) {
  const files = [];
  const walk = (d) => {
    for (const n of readdirSync(d).sort()) {
      const p = join(d, n);
      if (statSync(p).isDirectory()) walk(p);
      else if (n !== 'README.md') files.push(p);
    }
  };
  for (const d of ['data', 'pretrained', 'finetuned']) walk(join(out, d));
  files.push(join(out, 'eval.json'));
  const sha = (p) => createHash('sha256').update(readFileSync(p)).digest('hex');
  let bytes = 0;
  let mismatches = 0;
  process.stderr.write('\n');
  for (const f of files) {
    const rel = relative(out, f);
    bytes += statSync(f).size;
    const mine = sha(f);
    let note = '';
    if (check) {
      let theirs = '';
      try {
        theirs = sha(join(shipped, rel));
      } catch {}
      note = theirs === mine ? '  same as shipped' : '  DIFFERS from shipped';
      if (theirs !== mine) mismatches++;
    }
    process.stdout.write(`${mine}  ${rel}${note}\n`);
  }
  return { bytes, files: files.length, mismatches };
}

/** Under --check: removes the temp build and exits 0 when identical to the shipped files, else 1. */
export function finishCheck(out, shipped, mismatches) {
  rmSync(out, { recursive: true, force: true });
  process.stdout.write(
    mismatches ? `${mismatches} file(s) differ from ${shipped}\n` : `bit-for-bit identical to ${shipped}\n`,
  );
  process.exit(mismatches ? 1 : 0);
}
