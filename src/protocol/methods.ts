// The attribution methods, in one registry: everything the server, the extension, the webview,
// the CLI and package.json's settings need to know about a method, as data. Every list of
// methods elsewhere (the RPC enum, the panel's tabs, labels, which are signed, which need
// factors, the order of fallbacks) is derived from here; test/unit/protocol.test.ts checks
// package.json's enums against it. Adding a method = an entry here + its scorer on the server.

export interface MethodInfo {
  /** the id on the wire, in settings and on the command line */
  readonly id: string;
  /** its name for people */
  readonly label: string;
  /** one line for the settings' enum description */
  readonly description: string;
  /** score > 0 means supporting, < 0 opposing; false: a similarity that only ranks */
  readonly signed: boolean;
  /** needs EK-FAC factors (a `fit`) for the fine-tuned model */
  readonly needsFactors: boolean;
  /** needs a pre-trained stage (with its factors) besides the fine-tuned one */
  readonly needsPretrained: boolean;
  /** computes per-example training gradients */
  readonly gradientBased: boolean;
  /** runs the model at all (BM25 reads the text alone: no model, no checkpoints, the light lane) */
  readonly usesModel: boolean;
  /** can score from the gradient store (random projections) on large datasets */
  readonly usesGradientStore: boolean;
  /** when the chosen method cannot run, the first runnable method with a fallback rank is used (lowest first) */
  readonly fallbackRank?: number;
}

export const METHOD_REGISTRY = [
  {
    id: 'ekfac',
    label: 'EK-FAC',
    description: 'EK-FAC influence functions (Grosse et al. 2023): signed',
    signed: true,
    needsFactors: true,
    needsPretrained: false,
    gradientBased: true,
    usesModel: true,
    usesGradientStore: true,
  },
  {
    id: 'multistage',
    label: 'Multi-stage',
    description: "Multi-stage EK-FAC: traces a fine-tuned model's answer to pre-training data: signed",
    signed: true,
    needsFactors: true,
    needsPretrained: true,
    gradientBased: true,
    usesModel: true,
    usesGradientStore: false,
  },
  {
    id: 'gdp',
    label: 'Gradient dot',
    description: 'Gradient dot product (no Hessian): signed',
    signed: true,
    needsFactors: false,
    needsPretrained: false,
    gradientBased: true,
    usesModel: true,
    usesGradientStore: true,
    fallbackRank: 0,
  },
  {
    id: 'cosine',
    label: 'Gradient cosine',
    description: 'Gradient cosine: signed',
    signed: true,
    needsFactors: false,
    needsPretrained: false,
    gradientBased: true,
    usesModel: true,
    usesGradientStore: false,
    fallbackRank: 3,
  },
  {
    id: 'repsim',
    label: 'RepSim',
    description: 'RepSim: cosine of hidden states; similarity only, no sign',
    signed: false,
    needsFactors: false,
    needsPretrained: false,
    gradientBased: false,
    usesModel: true,
    usesGradientStore: false,
    fallbackRank: 1,
  },
  {
    id: 'bm25',
    label: 'BM25',
    description: 'BM25 text match; similarity only, no sign',
    signed: false,
    needsFactors: false,
    needsPretrained: false,
    gradientBased: false,
    usesModel: false,
    usesGradientStore: false,
    fallbackRank: 2,
  },
] as const satisfies readonly MethodInfo[];

export type Method = (typeof METHOD_REGISTRY)[number]['id'];

/** Every method id, in the registry's order (the panel's tabs, the settings' enum). */
export const METHODS: readonly Method[] = METHOD_REGISTRY.map((m) => m.id);

const BY_ID = new Map<string, MethodInfo>(METHOD_REGISTRY.map((m) => [m.id, m]));

/** The registry entry of `id` (undefined for an unknown id). */
export function methodInfo(id: string): MethodInfo | undefined {
  return BY_ID.get(id);
}

/** id → label, for people. */
export const METHOD_LABELS = Object.fromEntries(METHOD_REGISTRY.map((m) => [m.id, m.label])) as Record<Method, string>;

/** Methods whose scores have a sign (supporting / opposing); the others only rank similarity. */
export const SIGNED_METHODS: readonly Method[] = METHOD_REGISTRY.filter((m) => m.signed).map((m) => m.id);

/** Methods that compute per-example training gradients. */
export const GRADIENT_METHODS: readonly Method[] = METHOD_REGISTRY.filter((m) => m.gradientBased).map((m) => m.id);

/** Methods tried, in order, when the chosen one cannot run. */
export const FALLBACK_ORDER: readonly Method[] = METHOD_REGISTRY.flatMap((m) =>
  'fallbackRank' in m ? [{ id: m.id, rank: m.fallbackRank }] : [],
)
  .sort((a, b) => a.rank - b.rank)
  .map((m) => m.id);
