// `influence-lens <command> --help` works for every command and lists the options that command
// really parses (generated from the same parseArgs table); user-facing errors are one line,
// anything else (a bug) keeps its stack.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { CliError } from '../../src/server/cli/util';
import { ConfigFileError } from '../../src/server/service/config';
import { ServiceError } from '../../src/server/service/influence-service';
import { INTERNAL_ERRORS, isUserError, USER_ERRORS } from '../../src/server/user-errors';

const ROOT = resolve(import.meta.dirname, '../..');
const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', import.meta.resolve('tsx'), join(ROOT, 'src/server/cli.ts'), ...args], {
    encoding: 'utf8',
  });

test('every command answers --help with its parsed options', () => {
  const expect: Record<string, string[]> = {
    explain: ['--model <value>', '--compare <value>', '--pretrained-factors <value>', '--json'],
    serve: ['--config <value>', '--no-discovery', '--watch-parent <value>'],
    fit: ['--model <value>', '--partition <value>'],
    scan: ['--top-k <value>'],
    train: ['--exclude <value>'],
    demo: ['--query <value>'],
    inspect: ['--json'],
    gradients: ['--out <value>'],
    data: ['build | tokenizer | eval'],
  };
  for (const [command, flags] of Object.entries(expect)) {
    const r = cli(command, '--help');
    assert.equal(r.status, 0, `${command} --help: ${r.stderr}`);
    assert.match(r.stdout, new RegExp(`^usage: influence-lens ${command}`));
    for (const f of flags) assert.ok(r.stdout.includes(f), `${command} --help lacks ${f}:\n${r.stdout}`);
  }
});

test("each command's usage line names every option it parses, and a misspelt flag gets the one meant", () => {
  for (const command of ['inspect', 'gradients', 'tokenize', 'fit', 'explain', 'generate', 'serve', 'scan', 'train']) {
    const r = cli(command, '--help');
    const [usage, options] = r.stdout.split('\n\noptions:');
    const parsed = [...options.matchAll(/--([a-z][a-z0-9-]*)/g)].map((m) => m[1]).filter((o) => o !== 'help');
    assert.ok(parsed.length > 0, command);
    for (const o of parsed) assert.ok(usage.includes(`--${o}`), `${command}'s usage line lacks --${o}:\n${usage}`);
  }
  const r = cli('fit', '--model', 'x', '--skip-malformd');
  assert.equal(r.status, 1);
  assert.match(r.stderr, /unknown option --skip-malformd; did you mean --skip-malformed\?/);
});

test("a subcommand's --help shows its own usage and names every option it parses (data build, tokenizer, eval)", () => {
  for (const sub of ['build', 'tokenizer', 'eval']) {
    const r = cli('data', sub, '--help');
    assert.equal(r.status, 0, r.stderr);
    const [usage, options] = r.stdout.split('\n\noptions:');
    assert.match(usage, new RegExp(`^usage: influence-lens data ${sub} `));
    for (const other of ['build', 'tokenizer', 'eval'].filter((s) => s !== sub))
      assert.ok(!usage.includes(`data ${other} `), `data ${sub} --help shows data ${other}:\n${usage}`);
    const parsed = [...options.matchAll(/--([a-z][a-z0-9-]*)/g)].map((m) => m[1]).filter((o) => o !== 'help');
    for (const o of parsed) assert.ok(usage.includes(`--${o}`), `data ${sub}'s usage lacks --${o}:\n${usage}`);
  }
});

test('user-facing errors are recognised; anything else is a bug (its stack is printed)', () => {
  assert.equal(isUserError(new CliError('--port must be 0..65535')), true);
  assert.equal(isUserError(new ConfigFileError('influence-lens.json: port: must be ≤ 65535')), true);
  assert.equal(isUserError(new ServiceError('unknown dataset')), true);
  assert.equal(isUserError(new TypeError("Cannot read properties of undefined (reading 'x')")), false);
  assert.equal(isUserError(new Error('one line, but not a known kind')), false);
});

test('every error class under src/server and src/common is a user error or named internal with a reason', () => {
  const declared: string[] = [];
  for (const dir of ['src/server', 'src/common'])
    for (const f of readdirSync(join(ROOT, dir), { recursive: true, encoding: 'utf8' }))
      if (f.endsWith('.ts'))
        for (const m of readFileSync(join(ROOT, dir, f), 'utf8').matchAll(
          /class (\w+) extends (?:\w*Error|RpcError<[^>]*>)\b/g,
        ))
          declared.push(m[1]);
  for (const name of ['AdapterError', 'QueriesError', 'HelpRequested', 'StoreFileChanged', 'FitBusyError'])
    assert.ok(declared.includes(name), `${name} not found among ${declared.join(' ')}`);
  const user = new Set(USER_ERRORS.map((C) => C.name));
  for (const name of declared)
    assert.ok(
      user.has(name) || name in INTERNAL_ERRORS,
      `${name} is neither in USER_ERRORS nor in INTERNAL_ERRORS (src/server/user-errors.ts): a user would see it as a crash with a stack`,
    );
  for (const name of Object.keys(INTERNAL_ERRORS)) assert.ok(declared.includes(name), `${name} no longer exists`);
});

test('serve: a bad INFLUENCE_LENS_TOKEN is one line, before any model is loaded', () => {
  const r = spawnSync(
    process.execPath,
    ['--import', import.meta.resolve('tsx'), join(ROOT, 'src/server/cli.ts'), 'serve', '--no-discovery'],
    { encoding: 'utf8', env: { ...process.env, INFLUENCE_LENS_TOKEN: 'short' }, timeout: 60_000 },
  );
  assert.equal(r.status, 1, r.stderr);
  assert.equal(
    r.stderr.trim(),
    'influence-lens serve: INFLUENCE_LENS_TOKEN is too short: use at least 16 characters (32 random bytes is best)',
  );
});
