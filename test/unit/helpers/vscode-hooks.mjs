// Module hooks for unit tests of extension code: `import * as vscode from 'vscode'` gets the
// in-process fake (vscode-stub.ts). Registered by vscode-stub's `loadWithVscodeStub`.
const STUB = new URL('./vscode-stub.ts', import.meta.url).href;
export async function resolve(specifier, context, next) {
  if (specifier === 'vscode') return { url: STUB, shortCircuit: true };
  return next(specifier, context);
}
