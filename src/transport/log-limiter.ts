// Bounded logging for things a client can make happen over and over: refused connections, a
// gone client's dropped responses, protocol noise. Each kind of line (a key) is written at most
// `burst` times per window; the rest are counted and summarised in one line when the window
// ends ("… and 37724 more like it in the last 10 s"), so no client can fill the disk with logs.

export type LogLevel = 'info' | 'warn' | 'error';
export type LogFn = (level: LogLevel, message: string) => void;

interface Window {
  start: number;
  written: number;
  held: number;
  level: LogLevel;
  last: string;
}

export class LogLimiter {
  private readonly windows = new Map<string, Window>();
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly sink: LogFn,
    private readonly opts: { burst?: number; windowMs?: number } = {},
  ) {}

  private get burst(): number {
    return this.opts.burst ?? 5;
  }

  private get windowMs(): number {
    return this.opts.windowMs ?? 10_000;
  }

  /** Logs without a limit (lines that happen once per server or per accepted connection). */
  always(level: LogLevel, message: string): void {
    this.sink(level, message);
  }

  /** Logs `message` unless lines of this `key` already used up the window's burst. */
  limited(level: LogLevel, key: string, message: string): void {
    const now = Date.now();
    let w = this.windows.get(key);
    if (w && now - w.start >= this.windowMs) {
      this.summarise(key, w);
      w = undefined;
    }
    if (!w) {
      w = { start: now, written: 0, held: 0, level, last: message };
      this.windows.set(key, w);
    }
    if (w.written < this.burst) {
      w.written++;
      this.sink(level, message);
      return;
    }
    w.held++;
    w.last = message;
    if (!this.timer) {
      this.timer = setTimeout(() => this.flush(), this.windowMs);
      this.timer.unref?.();
    }
  }

  /** Writes the summaries of what was held back; called when windows end and on close. */
  flush(): void {
    this.timer = undefined;
    const now = Date.now();
    for (const [key, w] of this.windows) if (now - w.start >= this.windowMs || w.held) this.summarise(key, w);
  }

  private summarise(key: string, w: Window): void {
    this.windows.delete(key);
    if (!w.held) return;
    const secs = Math.max(1, Math.round((Date.now() - w.start) / 1000));
    this.sink(w.level, `${w.last} (and ${w.held} more like it in the last ${secs} s)`);
  }
}
