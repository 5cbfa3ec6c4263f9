// Lookups in tables keyed by what a user wrote (dataset ids, stage names from a config file or a
// request). `table[key]` would find `Object.prototype`'s members for keys like `__proto__`,
// `constructor` or `toString`; these look at the table's own entries only.

/** The table's own value for `key`, or undefined (never an inherited member). */
export function own<V>(table: Readonly<Record<string, V>> | undefined, key: string): V | undefined {
  return table !== undefined && Object.hasOwn(table, key) ? table[key] : undefined;
}
