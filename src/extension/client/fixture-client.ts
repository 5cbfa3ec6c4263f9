// TEST-ONLY client: replays canned server answers from a fixture file so the end-to-end test
// (test/e2e) can drive the editor before the real WebSocket client is plugged in. It is used
// only when the extension host's environment names a fixture in INFLUENCE_LENS_TEST_FIXTURE
// (the e2e harness sets it; nothing a user configures does). The fixture
// (test/fixtures/e2e/explain-results.fixture.json) is made by
// test/fixtures/e2e/make-explain-fixture.ts from one offline engine run on the embedded default.
// It answers only the query it was made for, so a wrong prompt/completion split fails the test.
import { readFileSync } from 'node:fs';
import type { ExplainParams, ExplainPartial, ExplainResult, Method } from '../../protocol/types';
import {
  type Cancellation,
  CancelledError,
  ClientError,
  type ClientInfo,
  type GenerateParams,
  type GenerateResult,
  type InfluenceClient,
  type ScanParams,
  type ScanResult,
} from './influence-client';

export const FIXTURE_ENV = 'INFLUENCE_LENS_TEST_FIXTURE';

interface Fixture {
  explain: Partial<Record<Method, ExplainResult>>;
  generate?: GenerateResult[];
  scan?: ScanResult;
  datasetPaths?: Record<string, string>;
}

export class FixtureClient implements InfluenceClient {
  readonly label = 'test fixture';
  private readonly fixture: Fixture;

  constructor(
    readonly path: string,
    /** delay between streamed partial results (ms) */
    private readonly stepMs = 120,
  ) {
    this.fixture = JSON.parse(readFileSync(path, 'utf8')) as Fixture;
  }

  async info(): Promise<ClientInfo> {
    const results = Object.values(this.fixture.explain).filter((r): r is ExplainResult => !!r);
    const methods = Object.keys(this.fixture.explain) as Method[];
    const datasets = [...new Set(results.flatMap((r) => [...r.supporting, ...r.opposing].map((e) => e.id.dataset)))];
    const all: Method[] = ['ekfac', 'multistage', 'gdp', 'cosine', 'repsim', 'bm25'];
    return {
      model: results[0]?.model ?? '(fixture)',
      device: 'fixture',
      datasets,
      datasetPaths: this.fixture.datasetPaths,
      methods,
      unavailable: Object.fromEntries(
        all.filter((m) => !methods.includes(m)).map((m) => [m, 'not in the test fixture']),
      ),
    };
  }

  async explain(
    params: ExplainParams,
    onPartial: (p: ExplainPartial) => void,
    token: Cancellation,
  ): Promise<ExplainResult> {
    const r = this.fixture.explain[params.method];
    if (!r) throw new ClientError(`The test fixture has no ${params.method} result.`);
    if (params.prompt !== r.query.prompt || params.completion !== r.query.completion)
      throw new ClientError(
        `The test fixture answers only prompt ${JSON.stringify(r.query.prompt)} with completion ` +
          `${JSON.stringify(r.query.completion)}; got ${JSON.stringify(params.prompt)} / ${JSON.stringify(params.completion)}.`,
      );
    const brief = (list: ExplainResult['supporting']) =>
      list.map((e) => ({ id: e.id, score: e.score, sign: e.sign, text: e.text }));
    for (const share of [0.3, 0.7]) {
      await sleep(this.stepMs, token);
      const n = Math.max(1, Math.round(share * params.topK));
      onPartial({
        method: r.method,
        scored: Math.round(share * r.scored),
        total: r.scored,
        supporting: brief(r.supporting.slice(0, n)),
        opposing: brief(r.opposing.slice(0, n)),
      });
    }
    await sleep(this.stepMs, token);
    return { ...r, supporting: r.supporting.slice(0, params.topK), opposing: r.opposing.slice(0, params.topK) };
  }

  async generate(params: GenerateParams, token: Cancellation): Promise<GenerateResult> {
    await sleep(this.stepMs, token);
    const g = this.fixture.generate?.find((x) => x.prompt === params.prompt);
    if (!g)
      throw new ClientError(`The test fixture has no completion for the prompt ${JSON.stringify(params.prompt)}.`);
    return g;
  }

  async scanDataset(params: ScanParams, token: Cancellation): Promise<ScanResult> {
    await sleep(this.stepMs, token);
    const s = this.fixture.scan;
    if (!s || s.dataset !== params.dataset) throw new ClientError(`The test fixture has no scan of ${params.dataset}.`);
    return { ...s, examples: s.examples.slice(0, params.topK ?? s.examples.length) };
  }

  dispose(): void {}
}

function sleep(ms: number, token: Cancellation): Promise<void> {
  return new Promise((resolve, reject) => {
    if (token.isCancellationRequested) return reject(new CancelledError());
    const sub = token.onCancellationRequested(() => {
      clearTimeout(t);
      reject(new CancelledError());
    });
    const t = setTimeout(() => {
      sub.dispose();
      resolve();
    }, ms);
  });
}
