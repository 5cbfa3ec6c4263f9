// The server a platform VSIX carries (scripts/package-vsix.ts --target): staged alone, with no
// checkout and no node_modules on any path, it answers with the embedded default model on this
// machine's Node, loads koffi's prebuild, and holds the native files of its target only.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, test } from 'node:test';
import { stageServer, TARGETS, type Target } from '../../scripts/package-vsix';

const here = `${process.platform}-${process.arch}` as Target;
const stage = mkdtempSync(join(tmpdir(), 'il-vsix-stage-'));
after(() => rmSync(stage, { recursive: true, force: true }));

function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((f) => statSync(join(dir, f)).isFile())
    .map((f) => f.split('\\').join('/'));
}

test('the staged server runs alone on this platform', {
  skip: !(here in TARGETS) && `no VSIX target for ${here}`,
}, async () => {
  const build = spawnSync(process.execPath, ['scripts/build.mjs'], { encoding: 'utf8' });
  assert.equal(build.status, 0, build.stderr);
  mkdirSync(join(stage, 'dist'));
  // what the VSIX's package.json gives packageRoot(): the package's name
  writeFileSync(join(stage, 'package.json'), JSON.stringify({ name: 'influence-lens' }));
  stageServer(stage, here);
  const all = files(stage);
  const natives = all.filter((f) => /\.(node|so(\.\d+)*|dylib|dll)$/.test(f));
  const [platform, arch] = TARGETS[here];
  assert.ok(natives.length >= 3, natives.join(', '));
  for (const f of natives)
    assert.ok(
      f.includes(`/${platform}/${arch}/`) || f.includes(`/${platform}_${arch}/`),
      `${f} is not for ${platform}/${arch}`,
    );
  assert.ok(all.includes('server/cli.mjs'));
  assert.ok(all.includes('server/service-worker.mjs'));
  assert.ok(all.includes('assets/default/finetuned/model.safetensors'));
  assert.ok(!all.some((f) => /^(src|test|tools)\//.test(f) || f.startsWith('node_modules/')));

  // a bare environment: no NODE_PATH, no checkout, cwd outside the stage
  const home = join(stage, 'home');
  mkdirSync(home);
  const env = { PATH: dirname(process.execPath), HOME: home, INFLUENCE_LENS_CACHE: join(home, 'cache') };
  const gen = spawnSync(
    process.execPath,
    [
      join(stage, 'server/cli.mjs'),
      'generate',
      '--model',
      join(stage, 'assets/default/finetuned'),
      '--prompt',
      'Q: What is the capital of Australia?\nA:',
    ],
    { cwd: home, encoding: 'utf8', env },
  );
  assert.equal(gen.status, 0, gen.stderr);
  assert.equal(gen.stdout, ' Sydney\n');
  const koffi = spawnSync(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `const k = (await import(${JSON.stringify(join(stage, 'server/node_modules/koffi/index.js'))})).default; console.log(k.version)`,
    ],
    { cwd: home, encoding: 'utf8', env },
  );
  assert.equal(koffi.status, 0, koffi.stderr);
  assert.match(koffi.stdout, /^\d+\.\d+\.\d+/);

  // the server the extension starts: its service opens in worker threads before it says where it listens
  const serve = spawn(process.execPath, [join(stage, 'server/cli.mjs'), 'serve', '--port', '0', '--no-discovery'], {
    cwd: home,
    env: { ...env, INFLUENCE_LENS_TOKEN: 'a-token-of-at-least-16-characters' },
  });
  let out = '';
  let err = '';
  serve.stdout.on('data', (d) => {
    out += d;
  });
  serve.stderr.on('data', (d) => {
    err += d;
  });
  const exited = new Promise<number | null>((res) => serve.on('exit', (code) => res(code)));
  try {
    for (let waited = 0; !/influence-lens server on ws:/.test(out); waited += 100) {
      const code = await Promise.race([exited, new Promise((r) => setTimeout(r, 100, 'waiting'))]);
      assert.equal(code, 'waiting', `serve exited (${code}) before listening:\n${err}`);
      assert.ok(waited < 120_000, `serve did not start in 120 s:\n${err}`);
    }
    assert.match(out, /methods now: .*bm25/);
  } finally {
    serve.kill('SIGTERM');
    await exited;
  }
});
