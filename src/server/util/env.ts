// Settings read from environment variables (INFLUENCE_LENS_*): a value that is set but not one the
// variable accepts is refused by name, never silently replaced by the default.

/** An environment variable set to a value it does not accept. */
export class EnvSettingError extends Error {
  override name = 'EnvSettingError';
}

/**
 * The number in `name`, above 0 (a whole one when `integer`), or undefined when it is unset or
 * empty. `what` says what it is, for the refusal (e.g. "MiB").
 */
export function positiveEnv(name: string, what: string, integer = false): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === '') return undefined;
  const n = Number(raw);
  if (!(Number.isFinite(n) && n > 0 && (!integer || Number.isInteger(n))))
    throw new EnvSettingError(
      `${name}="${raw}": use a ${integer ? 'whole ' : ''}number above 0 (${what}), or unset it`,
    );
  return n;
}

/** An on/off switch in `name`: undefined when unset or empty; anything but on/off words is refused. */
export function switchEnv(name: string): boolean | undefined {
  const raw = process.env[name];
  const v = (raw ?? '').trim().toLowerCase();
  if (v === '') return undefined;
  if (v === 'on' || v === '1' || v === 'true' || v === 'yes') return true;
  if (v === 'off' || v === '0' || v === 'false' || v === 'no') return false;
  throw new EnvSettingError(`${name}="${raw}": use on or off (1/0, true/false, yes/no), or unset it`);
}
