// The model engine: a Hugging Face checkpoint directory → ONNX graphs (forward + explicit
// backward, built by our graph builder) → ONNX Runtime sessions that return exactly the
// per-token and reduced quantities influence functions need.
//
// Conventions (shared with test/fixtures/golden/README.md):
// - inputs `input_ids`, `attention_mask` [B, T] int64, right padding; position t predicts
//   token t+1: `target_ids` [B, T] int64 and `target_weights` [B, T] float (0 = no loss).
// - loss of a sequence L = Σ_t w_t · (−log p(target_t | tokens ≤ t)); gradients are of Σ_b L_b.
// - per-module `a` = module input, `g` = ∂(Σ_b L_b)/∂(module output), both [B·T, d].
import { createHash } from 'node:crypto';
import {
  chmodSync,
  constants,
  copyFileSync,
  existsSync,
  linkSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  statfsSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { homedir } from 'node:os';
import { basename, join } from 'node:path';
import { isTemporaryName, tempPathFor, writeFileAtomic } from '../../common/atomic-write';
import type { TrainingConvention } from '../data/training';
import { collectWhenPiledUp, noteDroppedSoon } from '../util/gc';
import { mapLargeBlocks, releaseFreedMemory } from '../util/malloc';
import { targetEntries } from './adapter';
import { ARCHITECTURES, architectureFor } from './architectures';
import type { Architecture, BuildContext, TrackedModule, WeightSource } from './architectures/common';
import { type Checkpoint, openCheckpoint, sameWeightBytes } from './checkpoint';
import {
  contentDigest,
  copyHashing,
  FileChangedError,
  pinnedDigest,
  rememberDigest,
  sha256File,
} from './content-digest';
import { crossEntropyHead, type HeadLabels, headPlan } from './head';
import { checkRows } from './onnx/chunks';
import { DataType, Graph, type Tensor } from './onnx/graph';
import { arenaPolicy, createSession, type Device, floatTensor, ort } from './onnx/session';
import type { DType } from './safetensors';
import { loadTokenizer, type TokenizerHandle, withEmbeddingRows, withTraining } from './tokenizer';

export type ModuleSelection = 'mlp' | 'all';

/** What a compiled graph computes. Every field is optional; ask only for what you need. */
export interface GraphRequest {
  /** labels from `target_ids` ('data') or sampled from the model's own distribution ('sampled') */
  labels?: 'data' | 'sampled';
  /** `token_nll` [B, T] and `loss` [B] */
  tokenLoss?: boolean;
  /** `hidden_mean` [B, d]: final hidden state averaged over real tokens (RepSim) */
  hidden?: boolean;
  /** `logits` [B·T, V] */
  logits?: boolean;
  /** which linear modules are tracked for the per-module outputs */
  modules?: ModuleSelection;
  /** `a.<module>` [B·T, dIn] and `g.<module>` [B·T, dOut] */
  perToken?: boolean;
  /** `G.<module>` [B, dOut, dIn(+1 for the bias)] = Σ_t g_t a_tᵀ per sequence */
  exampleGrads?: boolean;
  /** `A.<module>` = Σ a aᵀ and `S.<module>` = Σ g gᵀ over real tokens (a with the bias 1 appended), `token_count` */
  covariance?: boolean;
  /** `L.<module>` [dOut, dIn'] = Σ_b (Q_Sᵀ G_b Q_A)², with inputs `QA.<module>`, `QS.<module>` (EK-FAC Λ) */
  lambda?: boolean;
  /** with inputs `M.<module>` [Q, dOut, dIn'] (preconditioned query gradients): `score.<module>` [B, Q] = ⟨M_q, G_b⟩ and `scores` (summed) */
  scores?: boolean;
  /**
   * with the same inputs: `token_scores` [Q, B, T], c_t = Σ_modules g_tᵀ M_q a_t (sums to `scores`
   * over t); with `eigenbasis`, [1, B, T] for query row 0 only
   */
  tokenScores?: boolean;
  /**
   * scores / token scores from a low-rank query (Grosse et al. §3.2): inputs `U.<module>` [Q, dOut, R]
   * (σ folded in) and `V.<module>` [Q, dIn', R] instead of `M`; c_t = Σ_r (Uᵀ g_t)_r (Vᵀ a_t)_r, so the
   * per-example gradient G is never formed (T·R·(dOut+dIn) work instead of T·dOut·dIn).
   */
  lowRank?: boolean;
  /**
   * scores / token scores with the query in the EK-FAC eigenbasis: inputs `R.<module>` [Q, dOut, dIn']
   * = (Q_Sᵀ P(G_q) Q_A), with `QA.<module>`, `QS.<module>`, instead of `M` = P(G_q). Each candidate's
   * tokens are rotated (Q_Sᵀ g_t, Q_Aᵀ a_t) and ⟨R_q, Q_Sᵀ G_b Q_A⟩ = ⟨P(G_q), G_b⟩ is scored, so
   * the query rows need no rotation back (T·(dOut² + dIn'²) more work per candidate).
   */
  eigenbasis?: boolean;
  /**
   * with `eigenbasis`: the rows come as rotated tokens instead of `R`: inputs `RS.<module>`
   * [Q, Tq, dOut] = g_q Q_S (zero-padded rows), `RA.<module>` [Tq, dIn'] = ã Q_A, one forward's
   * activations shared by every row (the rows of one query differ only in their loss weights), and
   * `IL.<module>` [dOut, dIn'] = 1/(Λ+λ), R_q = (RS_qᵀ RA) ⊙ IL. Scores are contracted without
   * forming R: ⟨R_q, rot_b⟩ = Σ_s Σ_o RS_q,s,o Y_b,o,s with Y_b = (IL ⊙ rot_b) RAᵀ, B·dOut·dIn'·Tq
   * work however many rows (it was ·Q·Tq with each row's own copy of RA), so no query row is held
   * whole (1.4 GB a row at Qwen2.5-0.5B); token scores form row 0 only.
   */
  eigenbasisTokens?: boolean;
  /**
   * `P.<module>` [B, kS, kA] = Σ_t (PSᵀ g_t)(PAᵀ ã_t)ᵀ with inputs `PA.<module>` [dIn', kA] and
   * `PS.<module>` [dOut, kS]: per-example gradients under random projections (LoGra-style
   * gradient store), formed without the full d_out × d_in gradient.
   */
  projected?: boolean;
  /** with inputs `QA`, `QS` and `IL.<module>` = 1/(Λ+λ): `self_influence` [B] = Σ_modules ⟨P(G_b), G_b⟩ */
  selfInfluence?: boolean;
  /** `grad_sqnorm` [B] = Σ_modules ‖G_b‖² (for gradient cosine) */
  gradNorms?: boolean;
  /** `grad.<param>` for every parameter */
  paramGrads?: boolean;
  /** `sampled_ids` [B, T]: the labels drawn when labels = 'sampled' */
  sampledIds?: boolean;
}

export interface ModuleInfo {
  name: string;
  kind: 'mlp' | 'attention';
  dIn: number;
  dOut: number;
  hasBias: boolean;
  /** the checkpoint tensor holding the module's weight */
  weightName: string;
}

/** A built module's description alone (no graph tensors): what callers outside the engine see. */
function moduleInfoOf({ name, kind, dIn, dOut, hasBias, weightName }: ModuleInfo): ModuleInfo {
  return { name, kind, dIn, dOut, hasBias, weightName };
}

export interface EngineOptions {
  device?: Device;
  threads?: number;
  /** 'mapped': weights are ONNX external data pointing into the safetensors files (no copy).
   *  'inputs': weights are graph inputs fed on every run (training). */
  weights?: 'mapped' | 'inputs';
  cacheDir?: string;
  /** 'fp64' builds every graph in double precision (finite-difference checks, ground truths). */
  precision?: 'fp32' | 'fp64';
  /** one-line notices (a corrupt cached graph was rebuilt); default: stderr */
  notice?: (line: string) => void;
  /** the base model folder when the model is a LoRA adapter (default: its base_model_name_or_path) */
  base?: string;
  /** rows of the LM head computed at once (default: head.ts's headPlan; tests set it small) */
  headRows?: number;
  /** words of the vocabulary the LM head takes at once with the data's labels (default: head.ts's headPlan; tests set it small) */
  headVocab?: number;
  /** query rows of attention computed at once (default: ATTENTION_CHUNK_BYTES of scores; tests set it small) */
  attentionRows?: number;
  /** how the model was trained on its records (data/training.ts; default: the default convention) */
  training?: TrainingConvention;
}

export interface Sequence {
  ids: number[];
  /** per-position loss weights (length = ids.length; position t predicts token t+1). Default: all 1 but the last. */
  weights?: number[];
}

export interface Batch {
  B: number;
  T: number;
  inputIds: BigInt64Array;
  attentionMask: BigInt64Array;
  targetIds: BigInt64Array;
  targetWeights: Float32Array;
  lengths: number[];
  /**
   * one sequence alone over the run budget (set by `memoryBoundedBatches`): its run maps its large
   * tensors (util/malloc.ts `mapLargeBlocks`), where the heap's fragmentation costs most
   */
  overBudget?: boolean;
  /**
   * one sequence that needs half the run budget or more (set by `memoryBoundedBatches`): a run
   * this large pays for its own page faults, and an arena would keep its memory after it
   */
  alone?: boolean;
}

export class EngineError extends Error {}

/**
 * Float buffers older transformers saved with a model and every version loads without a word
 * (GPT-2's and GPT-NeoX's attention masks `attn.bias` / `masked_bias`, the rotary `inv_freq`):
 * not another model's weights, so not named as unread (integer ones are set aside on opening).
 */
const IGNORED_BUFFER = /(?:^|\.)(?:attn|attention)\.(?:bias|masked_bias)$|(?:^|\.)rotary_emb\.inv_freq$/;

/**
 * Weights of a layer the config does not have are refused: with "num_hidden_layers": 1 and two
 * layers of weights the model ran as one layer, silently (transformers warns of unused weights;
 * here it is read as the config and the weights disagreeing, which an edited config or another
 * model's weights beside it are).
 */
function checkLayerWeights(ck: Checkpoint): void {
  const c = ck.config;
  const layers = [c.num_hidden_layers, c.n_layer].find((v) => typeof v === 'number') as number | undefined;
  if (layers === undefined) return;
  for (const [name, ref] of ck.weights) {
    const m = /(?:^|\.)(?:layers|h)\.(\d+)\./.exec(name);
    if (m && Number(m[1]) >= layers)
      throw new EngineError(
        `${ref.file} holds "${name}", a weight of layer ${m[1]}, but ${ck.configFiles[0]} says the model has ${layers} layer${layers === 1 ? '' : 's'} (0–${layers - 1}): the config and the weights disagree (an edited config, or another model's weights)`,
      );
  }
}

/** Right-pad sequences into a batch; target of position t is token t+1. */
export function makeBatch(seqs: Sequence[], padId = 0): Batch {
  if (!seqs.length) throw new EngineError('empty batch');
  const B = seqs.length;
  const T = Math.max(...seqs.map((s) => s.ids.length));
  if (T === 0) throw new EngineError('all sequences are empty');
  const inputIds = new BigInt64Array(B * T).fill(BigInt(padId));
  const attentionMask = new BigInt64Array(B * T);
  const targetIds = new BigInt64Array(B * T);
  const targetWeights = new Float32Array(B * T);
  seqs.forEach((s, b) => {
    if (s.weights && s.weights.length !== s.ids.length)
      throw new EngineError(`sequence ${b}: ${s.weights.length} weights for ${s.ids.length} tokens`);
    for (let t = 0; t < s.ids.length; t++) {
      inputIds[b * T + t] = BigInt(s.ids[t]);
      attentionMask[b * T + t] = 1n;
      if (t + 1 < s.ids.length) {
        targetIds[b * T + t] = BigInt(s.ids[t + 1]);
        targetWeights[b * T + t] = s.weights ? s.weights[t] : 1;
      }
    }
  });
  return { B, T, inputIds, attentionMask, targetIds, targetWeights, lengths: seqs.map((s) => s.ids.length) };
}

/** $INFLUENCE_LENS_CACHE, or ~/.cache/influence-lens when it is unset or empty (as every INFLUENCE_LENS_* setting). */
export function defaultCacheDir(): string {
  const set = process.env.INFLUENCE_LENS_CACHE;
  return set?.trim() ? set : join(homedir(), '.cache', 'influence-lens');
}

/**
 * Outputs of past runs that may pile up before the next run collects them (util/gc.ts). The pile
 * sits under the next run's peak: at 512 MiB, a 2,048-token covariance run at the Pythia-70M shape
 * (403 MB of per-token rows) ran over one or two dead runs' rows. One collection (tens of ms) per
 * 64 MiB of outputs is still noise beside the runs that made them.
 */
const OUTPUT_GARBAGE_BYTES = 64 * 2 ** 20;

const STORAGE_TYPES: Partial<Record<DType, DataType>> = {
  F32: DataType.FLOAT,
  F16: DataType.FLOAT16,
  BF16: DataType.BFLOAT16,
};

/**
 * Whether a graph's session gets ONNX Runtime's memory arena (`arenaPolicy`): under the default,
 * the graphs that score candidates in batch after batch and return only scores. A heatmap graph
 * (token scores) runs over a few shown examples and is left without.
 */
export function arenaFor(req: GraphRequest): boolean {
  const policy = arenaPolicy();
  if (policy !== 'scores') return policy === 'on';
  return !!req.scores && !req.tokenScores;
}

export class Model {
  readonly arch: Architecture;
  private tok?: TokenizerHandle;
  private sessions = new Map<string, Promise<CompiledGraph>>();
  private linkDir?: { dir: string; names: Map<string, string>; inMemory: boolean; digests: string[] };

  private constructor(
    readonly checkpoint: Checkpoint,
    readonly options: EngineOptions,
  ) {
    this.arch = architectureFor(checkpoint.config, checkpoint.configFiles[0]);
    checkLayerWeights(checkpoint);
    // an adapter is checked against the base's layers once, when opened
    if (checkpoint.adapter) this.buildForward(new Graph(), 'inputs');
    if (checkpoint.baseNote) this.notify(checkpoint.baseNote);
  }

  /** The float type of this model's graphs, which EK-FAC factors fitted or opened for it are held in. */
  get precision(): 'fp32' | 'fp64' {
    return this.options.precision === 'fp64' ? 'fp64' : 'fp32';
  }

  /** Loaded on first use: inspecting or benchmarking a model does not need one. */
  get tokenizer(): TokenizerHandle {
    if (!this.tok) {
      const tok = loadTokenizer(this.checkpoint.tokenizerDir, { modelType: this.checkpoint.modelType });
      const rows = this.checkpoint.config.vocab_size;
      const where = join(this.checkpoint.tokenizerDir, 'tokenizer.json');
      const checked =
        typeof rows === 'number' && rows > 0
          ? withEmbeddingRows(tok, rows, this.checkpoint.configFiles[0], where)
          : tok;
      this.tok = this.options.training ? withTraining(checked, this.options.training, where) : checked;
    }
    return this.tok;
  }

  static open(dir: string, options: EngineOptions = {}): Model {
    return new Model(openCheckpoint(dir, { base: options.base }), options);
  }

  /** A checkpoint already opened (a training checkpoint read with the final model's tokenizer: model/checkpoints.ts). */
  static fromCheckpoint(checkpoint: Checkpoint, options: EngineOptions = {}): Model {
    return new Model(checkpoint, options);
  }

  get config(): Record<string, unknown> {
    return this.checkpoint.config;
  }

  describe(): string {
    return this.arch.describe(this.config);
  }

  /** Parameter names in checkpoint order, with shapes: the model's names (a base-model file's keys
   * carry the prefix checkpoint.ts adds), which the graphs and the trainer use. */
  parameters(): Array<{ name: string; shape: number[] }> {
    return [...this.checkpoint.weights].map(([name, w]) => ({ name, shape: w.shape }));
  }

  /**
   * Float tensors of the checkpoint the forward pass never reads (a tied head stored twice reads
   * as one): what transformers warns of as unused weights. `inspect` lists them.
   */
  unreadWeights(): string[] {
    // a throwaway graph of the whole model: built once (every stage opened, every fit asks)
    if (this.unread) return this.unread;
    const { weights } = this.buildForward(new Graph(), 'inputs');
    // a head stored beside the embedding it is tied to (outputHead reads such a head as tied only
    // when its bytes are the embedding's, and refuses it otherwise): transformers ties it silently
    const head = ARCHITECTURES.find((a) => a.modelTypes.includes(this.checkpoint.modelType))?.headNames ?? [];
    this.unread = [...this.checkpoint.weights.keys()].filter(
      (n) => !weights.tensors.has(n) && !head.includes(n) && !IGNORED_BUFFER.test(n),
    );
    return this.unread;
  }

  private unread?: string[];

  /**
   * `unreadWeights` as a warning for the commands that compute with the model (fit, explain, scan,
   * the server): another model's weights beside this one's ran without a word there, where
   * transformers warns and only `inspect` said so.
   */
  unreadWeightsWarning(): string | undefined {
    const unread = this.unreadWeights();
    if (!unread.length) return undefined;
    return `${this.checkpoint.dir} holds ${unread.length} float tensor(s) the model does not read (e.g. ${unread[0]}), as transformers warns of unused weights: another model's weights beside this one's? (influence-lens inspect lists them)`;
  }

  /** Tracked linear modules (built from a throwaway graph, so always in sync with the builders). */
  modules(selection: ModuleSelection = 'all'): ModuleInfo[] {
    const { modules } = this.buildForward(new Graph(), 'inputs');
    return select(modules, selection).map(moduleInfoOf);
  }

  private buildForward(g: Graph, mode: 'mapped' | 'inputs') {
    const weights = mode === 'mapped' ? this.mappedWeights(g) : inputWeights(g, this.checkpoint);
    const inputIds = g.input('input_ids', DataType.INT64, ['B', 'T']);
    const attentionMask = g.input('attention_mask', DataType.INT64, ['B', 'T']);
    const bt = g.noGrad(() => g.shapeOf(inputIds));
    const adapter = this.checkpoint.adapter;
    const lora = adapter && { adapter, usedTensors: new Set<string>(), matchedTargets: new Set<string>() };
    const rows = this.options.attentionRows;
    if (rows !== undefined) checkRows('attention chunk', rows);
    const ctx: BuildContext = {
      g,
      w: weights.source,
      inputIds,
      attentionMask,
      bt,
      modules: [],
      lora,
      attentionRows: rows,
    };
    const out = this.arch.forward(ctx, this.config);
    if (lora) checkAdapterCoverage(lora, this.describe());
    return { ctx, out, weights, modules: ctx.modules };
  }

  /** Compile (and cache) a graph computing what `req` asks for. */
  compile(req: GraphRequest): Promise<CompiledGraph> {
    const mode = this.options.weights ?? 'mapped';
    const key = JSON.stringify([mode, req]);
    let s = this.sessions.get(key);
    if (!s) {
      s = this.compileNow(req, mode);
      this.sessions.set(key, s);
      s.catch(() => this.sessions.delete(key));
    }
    return s;
  }

  private async compileNow(req: GraphRequest, mode: 'mapped' | 'inputs'): Promise<CompiledGraph> {
    const g = new Graph(this.options.precision === 'fp64' ? DataType.DOUBLE : DataType.FLOAT);
    const { ctx, out, weights, modules: all } = this.buildForward(g, mode);
    const modules = select(all, req.modules ?? 'all');
    const outputs = buildOutputs(g, ctx, out, modules, weights, req, {
      rows: this.options.headRows,
      vocabBlock: this.options.headVocab,
    });
    const bytes = g.encode();
    const arena = arenaFor(req);
    const session = await this.createSessionFor(bytes, arena);
    const paramInputs =
      mode === 'inputs'
        ? weights.inputNames.map((n) => ({ name: n, shape: this.checkpoint.weights.get(n)!.shape }))
        : null;
    // an arena would keep a long sequence's run resident (at 2,048 tokens of Pythia-70M explain
    // peaked at 3.4 GB with it, 2.3 GB without): runs of one sequence that fills half the run budget
    // or more (`Batch.alone`) go to a session without one, opened once needed
    let lean: Promise<ort.InferenceSession> | undefined;
    const leanSession = arena
      ? () =>
          (lean ??= this.createSessionFor(bytes, false).catch((e) => {
            lean = undefined; // a failed open is retried by the next long run
            throw e;
          }))
      : null;
    return new CompiledGraph(
      session,
      outputs,
      modules,
      paramInputs,
      g.float === DataType.DOUBLE,
      leanSession,
      g.aliases,
    );
  }

  private async createSessionFor(bytes: Uint8Array, arena: boolean): Promise<ort.InferenceSession> {
    const opts = {
      arena,
      device: this.options.device,
      threads: this.options.threads,
      optimization: this.options.precision === 'fp64' ? ('basic' as const) : ('all' as const),
    };
    if ((this.options.weights ?? 'mapped') === 'inputs') return createSession(bytes, opts);
    const links = this.links();
    if (links.inMemory) {
      // Could not snapshot them: hand ORT the weight files as buffers, the bytes that were digested.
      const externalData = [...links.names.entries()].map(([file, name], i) => {
        let data: Buffer;
        try {
          data = readFileSync(file);
        } catch (e) {
          throw new EngineError(
            `${file} could not be snapshotted into the cache (${links.dir}) nor read into memory (${(e as Error).message}): free space in the cache folder or set cacheDir to one with room`,
          );
        }
        checkCopy(file, createHash('sha256').update(data).digest('hex'), links.digests[i]);
        checkLength(file, data.length, this.checkpoint);
        return { path: name, data };
      });
      return createSession(bytes, { ...opts, externalData });
    }
    // Named by content: a graph built in another precision or by another version never collides.
    const file = join(links.dir, `${createHash('sha256').update(bytes).digest('hex').slice(0, 16)}.onnx`);
    // The graph is rebuilt in memory anyway: the file on disk is used only if it holds exactly
    // these bytes, so a truncated or damaged one is replaced instead of failing forever.
    const onDisk = existsSync(file) ? readFileSync(file) : null;
    if (!onDisk?.equals(bytes)) {
      if (onDisk)
        this.notify(`cached graph ${file} was damaged (${onDisk.length} of ${bytes.length} bytes); rebuilt it`);
      try {
        writeFileAtomic(file, bytes);
      } catch (e) {
        // the graph must sit beside the weights it references: without a writable cache there is no session
        throw new EngineError(
          `could not write the compiled graph ${file} (${(e as Error).message}): free space in the cache folder, or point INFLUENCE_LENS_CACHE (the server's "cacheDir") at a writable folder with room`,
        );
      }
    }
    return createSession(file, opts);
  }

  private notify(line: string) {
    (this.options.notice ?? ((l: string) => process.stderr.write(`influence-lens: ${l}\n`)))(line);
  }

  /**
   * ORT only reads external data from inside the model's directory (no absolute paths, no
   * symlinks out), and it maps the file: a weight file the user rewrites in place
   * (`save_pretrained` into the same folder, `cp` over it) would change under a running session,
   * or shrink under it (a bus error that kills the server). So the graphs read a private snapshot
   * of each weight file in the cache: copied (a reflink where the filesystem has them), checked
   * against the file's content digest, then never written again. The directory is named by the
   * weights' content digests, never by path, size or mtime, so folders with other bytes never
   * share one, and another process can only put the same bytes there.
   */
  private links() {
    if (this.linkDir) return this.linkDir;
    const ck = this.checkpoint;
    const root = this.options.cacheDir ?? defaultCacheDir();
    // Resolved first: in a Hugging Face hub cache, snapshots/<rev>/model.safetensors is a
    // relative symlink into ../../blobs.
    const real = ck.files.map((f) => realpathSync(f));
    // the digests the checkpoint's fingerprint has (or will have): the snapshot must be those bytes
    const digests = ck.files.map((f) => pinnedDigest(ck, f, root));
    const id = hash(JSON.stringify(digests));
    const dir = join(root, 'graphs', id);
    mkdirSync(dir, { recursive: true });
    // marked as used before it is filled, so that no other process prunes it meanwhile
    const mark = markSnapshot(dir, real);
    const names = new Map<string, string>();
    let inMemory = false;
    ck.files.forEach((f, i) => {
      const name = `w${i}-${basename(f)}`;
      names.set(f, name);
      const target = join(dir, name);
      if (isSnapshotOf(target, real[i], digests[i], root)) return;
      const tmp = tempPathFor(target);
      try {
        const size = statSync(real[i]).size;
        const free = freeBytes(dir);
        if (free !== undefined && free < size + (64 << 20))
          throw new Error(`${free} bytes free, ${size} needed for a copy`);
        checkCopy(f, snapshotCopy(real[i], tmp), digests[i]);
        checkLength(f, statSync(tmp).size, ck);
        if (process.platform !== 'win32') chmodSync(tmp, 0o444); // Windows cannot rename over a read-only file
        renameSync(tmp, target);
        rememberDigest(target, digests[i], root);
      } catch (e) {
        rmSync(tmp, { force: true });
        if (e instanceof EngineError) throw e;
        if (e instanceof FileChangedError)
          throw new EngineError(`${e.message}: send the request again once it is written`);
        // no room (or no right) for a copy in the cache: the graphs read the user's file through
        // a hard link, as before snapshots, or, across filesystems, from memory; either way said
        const why = (e as Error).message;
        try {
          // (a link already there is kept: relinking would move the file's ctime, a change on disk)
          if (!(existsSync(target) && sameFile(target, real[i]))) {
            rmSync(target, { force: true });
            linkSync(real[i], target);
          }
          this.notify(
            `could not snapshot ${f} into ${dir} (${why}): the graphs read the file itself, so do not rewrite it in place while this runs`,
          );
        } catch {
          this.notify(`could not snapshot ${f} into ${dir} (${why}): holding the weights in memory instead`);
          inMemory = true;
        }
      }
    });
    if (!inMemory) pruneSnapshots(join(root, 'graphs'), id, mark);
    this.linkDir = { dir, names, inMemory, digests };
    return this.linkDir;
  }

  private mappedWeights(g: Graph): Weights {
    const names = this.checkpoint.files.length ? this.links().names : new Map<string, string>();
    const tensors = new Map<string, Tensor>();
    const source: WeightSource = {
      has: (n) => this.checkpoint.weights.has(n),
      shape: (n) => weightRef(this.checkpoint, n).shape,
      sameValues: (a, b) => sameWeightBytes(this.checkpoint, a, b),
      get: (n) => {
        let t = tensors.get(n);
        if (t) return t;
        const ref = weightRef(this.checkpoint, n);
        const dt = STORAGE_TYPES[ref.dtype];
        if (dt === undefined) throw new EngineError(`${ref.file}: tensor ${n} has unsupported dtype ${ref.dtype}`);
        const location = names.get(ref.file)!;
        t = g.initializer(`p:${n}`, dt, ref.shape, { location, offset: ref.byteOffset, length: ref.byteLength });
        if (dt !== g.float) t = g.cast(t, g.float);
        tensors.set(n, t);
        return t;
      },
    };
    return { source, tensors, inputNames: [] };
  }
}

interface Weights {
  source: WeightSource;
  /** parameter name → the float tensor the graph uses (gradients are taken against it) */
  tensors: Map<string, Tensor>;
  /** graph input names, in 'inputs' mode */
  inputNames: string[];
}

function weightRef(ck: Checkpoint, name: string) {
  const ref = ck.weights.get(name);
  if (!ref) {
    // an integer tensor is set aside when the checkpoint opens (the causal-mask buffers); one the
    // model needs is a weight stored in the wrong type
    const stored = ck.ignored?.find((t) => t.name === name);
    if (stored)
      throw new EngineError(
        `${ck.dir}: tensor "${name}" is stored as ${stored.dtype}, an integer type; ${ck.modelType} needs it as floats (F32, F16, BF16 or F64)`,
      );
    throw new EngineError(`${ck.dir}: the checkpoint has no tensor "${name}", which ${ck.modelType} needs`);
  }
  return ref;
}

function inputWeights(g: Graph, ck: Checkpoint): Weights {
  const tensors = new Map<string, Tensor>();
  const inputNames: string[] = [];
  return {
    tensors,
    inputNames,
    source: {
      has: (n) => ck.weights.has(n),
      shape: (n) => weightRef(ck, n).shape,
      sameValues: (a, b) => sameWeightBytes(ck, a, b),
      get: (n) => {
        let t = tensors.get(n);
        if (!t) {
          t = g.input(`p:${n}`, g.float, weightRef(ck, n).shape);
          tensors.set(n, t);
          inputNames.push(n);
        }
        return t;
      },
    },
  };
}

/**
 * PEFT's rule: some target_modules entry must select a linear layer (entries that select
 * nothing are fine: generic lists name layers of several architectures). And every adapter
 * tensor must have found the selected linear layer it adapts, so that no weight of the adapter
 * is silently left out of the forward.
 */
function checkAdapterCoverage(lora: NonNullable<BuildContext['lora']>, base: string) {
  const { adapter } = lora;
  if (!lora.matchedTargets.size) {
    const entries = targetEntries(adapter);
    throw new EngineError(
      `${adapter.configPath}: "target_modules" ${entries.length > 1 ? 'entries' : 'entry'} ${entries.map((t) => JSON.stringify(t)).join(', ')} ${entries.length > 1 ? 'match' : 'matches'} no linear layer of the base model (${base})`,
    );
  }
  for (const name of adapter.header.tensors.keys())
    if (!lora.usedTensors.has(name))
      throw new EngineError(
        `${adapter.weightsPath}: tensor ${name} adapts no linear layer of the base model that "target_modules" in adapter_config.json selects (base: ${base})`,
      );
}

function select(modules: TrackedModule[], selection: ModuleSelection): TrackedModule[] {
  return selection === 'all' ? modules : modules.filter((m) => m.kind === 'mlp');
}

/** Bytes free to this user where `dir` is, when the platform says. */
function freeBytes(dir: string): number | undefined {
  try {
    const s = statfsSync(dir);
    return Number(s.bavail) * Number(s.bsize);
  } catch {
    return undefined;
  }
}

function sameFile(a: string, b: string): boolean {
  const x = statSync(a, { bigint: true });
  const y = statSync(b, { bigint: true });
  return x.dev === y.dev && x.ino === y.ino;
}

/**
 * Whether `target` is a snapshot of `source`'s bytes: a file of its own (not a hard link to the
 * user's file, as an older version of the cache made) holding the digested content.
 */
function isSnapshotOf(target: string, source: string, digest: string, cacheDir: string): boolean {
  if (!existsSync(target)) return false;
  if (sameFile(target, source) || statSync(target).nlink !== 1) return false;
  return contentDigest(target, cacheDir) === digest;
}

/**
 * A private copy of a weight file and the sha256 of what was copied: a reflink where the
 * filesystem makes one at once (then hashed), else read and written in pieces, hashed on the way.
 * (`copyFileSync` with a reflink fallback loops forever on ext4 when the file shrinks meanwhile.)
 */
function snapshotCopy(from: string, to: string): string {
  try {
    copyFileSync(from, to, constants.COPYFILE_FICLONE_FORCE);
    return sha256File(to);
  } catch (e) {
    if (e instanceof FileChangedError) throw e;
    rmSync(to, { force: true });
    return copyHashing(from, to);
  }
}

/** Every tensor the checkpoint's header placed in this file lies inside the copy (no half-written file). */
function checkLength(file: string, size: number, ck: Checkpoint): void {
  for (const w of ck.weights.values())
    if (w.file === file && w.byteOffset + w.byteLength > size)
      throw new EngineError(
        `${file} is shorter (${size} bytes) than its tensors need (${w.name} ends at ${w.byteOffset + w.byteLength}): it is being written or was cut; send the request again once it is complete`,
      );
}

/**
 * Snapshots would pile up, one full copy per retraining of a folder: each snapshot folder marks
 * which sets of source files use it (`used-by-<hash>`, one empty file each, so two processes never
 * rewrite one list), and taking a snapshot for sources S removes S's mark from every other folder,
 * deleting a folder no source uses any more. A server still serving the old weights opens the new
 * ones at its next request anyway (the files changed); a mapped file stays valid once deleted.
 */
function markSnapshot(dir: string, sources: string[]): string {
  const mark = `used-by-${hash(JSON.stringify(sources))}`;
  try {
    writeFileSync(join(dir, mark), '');
  } catch {
    // a read-only cache: nothing will be pruned either
  }
  return mark;
}

function pruneSnapshots(graphs: string, current: string, mark: string): void {
  // Windows cannot delete a file a running process maps: a half-deleted folder would stay forever
  if (process.platform === 'win32') return;
  try {
    for (const other of readdirSync(graphs)) {
      if (other === current || isTemporaryName(other)) continue;
      const marked = join(graphs, other, mark);
      if (!existsSync(marked)) continue;
      rmSync(marked, { force: true });
      if (!readdirSync(join(graphs, other)).some((n) => n.startsWith('used-by-')))
        rmSync(join(graphs, other), { recursive: true, force: true });
    }
  } catch {
    // pruning is housekeeping: a read-only or busy cache keeps its folders
  }
}

/**
 * The rows of `hidden` whose target weight is not 0, with their labels and weights (the first row
 * goes along once more, weighted 0, so that a batch without any weighted token still runs the head
 * over one row: no step of it ever sees an empty tensor). The rows' gradient flows back to their
 * places in `hidden` (Gather's backward scatters it); the other rows get none from the head, as
 * their weight 0 gave them before.
 */
function weightedRows(
  g: Graph,
  hidden: Tensor,
  labels: HeadLabels,
  wFlat: Tensor,
): { hidden: Tensor; labels: HeadLabels; weights: Tensor } {
  const I = DataType.INT64;
  const { keep, pick, weights } = g.noGrad(() => {
    const inLoss = g.node('Cast', [wFlat], [{ dtype: DataType.BOOL, shape: wFlat.shape }], { to: DataType.BOOL })[0];
    const nz = g.node('NonZero', [inLoss], [{ dtype: I, shape: [1, 'M'] }])[0];
    const rows = g.node('Reshape', [nz, g.ints([-1])], [{ dtype: I, shape: ['M'] }])[0];
    const keep = g.node('Concat', [rows, g.ints([0])], [{ dtype: I, shape: ['M1'] }], { axis: 0 })[0];
    const pick = (x: Tensor) => {
      const flat =
        x.shape.length === 1 ? x : g.node('Reshape', [x, g.ints([-1])], [{ dtype: x.dtype, shape: ['N'] }])[0];
      return g.node('Gather', [flat, keep], [{ dtype: x.dtype, shape: ['M1'] }], { axis: 0 })[0];
    };
    const w = g.node('Gather', [wFlat, rows], [{ dtype: g.float, shape: ['M'] }], { axis: 0 })[0];
    const weights = g.node('Concat', [w, g.floats([0], [1])], [{ dtype: g.float, shape: ['M1'] }], { axis: 0 })[0];
    return { keep, pick, weights };
  });
  const kept: HeadLabels =
    labels.kind === 'data'
      ? { kind: 'data', targets: g.noGrad(() => pick(labels.targets)) }
      : { kind: 'sampled', uniforms: g.noGrad(() => pick(labels.uniforms)) };
  return { hidden: g.gatherRows(hidden, keep), labels: kept, weights };
}

/** A copy of the weights must hold the bytes their digest (the model's fingerprint) was taken of. */
function checkCopy(file: string, got: string, want: string): void {
  if (got !== want)
    throw new EngineError(
      `${file} changed while it was being read (its content is not the one digested a moment before): it is being written; send the request again once it is complete`,
    );
}

function hash(s: string): string {
  return createHash('sha256').update(s).digest('hex').slice(0, 16);
}

/**
 * Emit the loss and the requested outputs; returns the output names, aliases included (an output
 * name that reads another output's tensor: `Graph.aliases`, `CompiledGraph.aliases`).
 */
function buildOutputs(
  g: Graph,
  ctx: BuildContext,
  out: { unembedding: Tensor; hidden: Tensor },
  modules: TrackedModule[],
  weights: Weights,
  req: GraphRequest,
  head: { rows?: number; vocabBlock?: number },
): string[] {
  const names: string[] = [];
  // a tensor already emitted under another name becomes an alias of that output, not a copy
  const emit = (t: Tensor, name: string) => {
    g.output(t, name);
    names.push(name);
  };
  if (req.eigenbasis && (req.lowRank || req.lambda || req.selfInfluence))
    throw new EngineError('an eigenbasis query cannot be combined with lowRank, lambda or selfInfluence in one graph');
  if (req.eigenbasisTokens && !req.eigenbasis)
    throw new EngineError('eigenbasisTokens describes the rows of an eigenbasis query: set eigenbasis too');
  const btShape = ctx.bt;
  const weightsIn = g.input('target_weights', g.float, ['B', 'T']);
  const wFlat = g.noGrad(() => g.reshape(weightsIn, [-1]));

  // With a low-rank query, ‖G_b‖² comes from token Gram matrices instead (see below): no G at all.
  const needG =
    req.exampleGrads ||
    req.lambda ||
    (req.scores && !req.lowRank && !req.eigenbasis) ||
    req.selfInfluence ||
    (req.gradNorms && !req.lowRank);
  const needModuleGrads = req.perToken || req.covariance || req.scores || req.tokenScores || req.projected || needG;

  // The head and its cross-entropy in chunks of tokens (head.ts). Labels: from the data, or
  // drawn from the model's own predictive distribution (uniforms fed from JS).
  const W = out.unembedding;
  const plan = headPlan(W.shape[0] as number, W.shape[1] as number, g.float === DataType.DOUBLE ? 8 : 4, head);
  const labels: HeadLabels =
    req.labels === 'sampled'
      ? { kind: 'sampled', uniforms: g.input('sample_uniform', g.float, ['B', 'T']) }
      : { kind: 'data', targets: g.input('target_ids', DataType.INT64, ['B', 'T']) };
  const grad = !!(needModuleGrads || req.paramGrads);
  let total: Tensor;
  if (!req.tokenLoss && !(req.labels === 'sampled' && req.sampledIds)) {
    // Unless every token's loss is an output, only the tokens in the loss reach the head: at the
    // others its loss and gradient are 0 × a pass over the whole vocabulary (a prompt, a chat's
    // other turns, padding), at a 50k-262k vocabulary much of a sequence's forward and backward.
    const kept = weightedRows(g, out.hidden, labels, wFlat);
    const { nll } = crossEntropyHead(g, kept.hidden, W, kept.labels, plan, grad);
    total = g.reduceSum(g.mul(nll, kept.weights), [0], false);
  } else {
    const { nll, targets } = crossEntropyHead(g, out.hidden, W, labels, plan, grad);
    if (req.labels === 'sampled' && req.sampledIds)
      emit(
        g.noGrad(() => g.reshape(targets, btShape, ['B', 'T'])),
        'sampled_ids',
      );
    const weighted = g.mul(nll, wFlat);
    total = g.reduceSum(weighted, [0], false);
    if (req.tokenLoss) {
      emit(
        g.noGrad(() => g.reshape(nll, btShape, ['B', 'T'])),
        'token_nll',
      );
      emit(
        g.noGrad(() => g.reduceSum(g.reshape(weighted, btShape, ['B', 'T']), [1], false)),
        'loss',
      );
    }
  }
  const maskF = g.noGrad(() => g.cast(g.reshape(ctx.attentionMask, [-1]), g.float));
  if (req.hidden) {
    const d = out.hidden.shape[1] as number;
    emit(
      g.noGrad(() => {
        const hm = g.mul(out.hidden, g.unsqueeze(maskF, [1]));
        const h3 = g.reshape(hm, g.concatInts([btShape, g.ints([d])]), ['B', 'T', d]);
        const sum = g.reduceSum(h3, [1], false);
        const cnt = g.reduceSum(g.cast(ctx.attentionMask, g.float), [1], true);
        return g.div(sum, cnt);
      }),
      'hidden_mean',
    );
  }
  if (req.logits)
    emit(
      g.noGrad(
        () => g.node('Gemm', [out.hidden, W], [{ dtype: g.float, shape: ['B*T', W.shape[0]] }], { transB: 1 })[0],
      ),
      'logits',
    );
  const wrt: Tensor[] = [];
  if (needModuleGrads) wrt.push(...modules.map((m) => m.output));
  if (req.paramGrads) wrt.push(...weights.tensors.values());
  if (!wrt.length) return names;
  const grads = g.grad(total, wrt);

  if (needModuleGrads) {
    let scoreSum: Tensor | null = null;
    let tokenSum: Tensor | null = null;
    let selfSum: Tensor | null = null;
    let normSum: Tensor | null = null;
    const accumulate = (acc: Tensor | null, t: Tensor) => (acc ? g.add(acc, t) : t);
    const sharedA = new Map<string, Tensor>();
    for (const m of modules) {
      const gy = grads.get(m.output.name) ?? g.noGrad(() => g.zerosLike(m.output));
      g.noGrad(() => {
        if (req.perToken) {
          // q/k/v (and gate/up) read one tensor: one output for it, the other names alias it
          emit(m.input, `a.${m.name}`);
          emit(gy, `g.${m.name}`);
        }
        // The bias is absorbed as an extra input feature fixed at 1.
        // Built only when used: an unused Concat still ran (ORT kept it), [N, dIn + 1] per module and run.
        let aBuilt: Tensor | null = null;
        const withOne = () => {
          aBuilt ??= m.hasBias ? g.withOnes(m.input) : m.input;
          return aBuilt;
        };
        const dIn = m.dIn + (m.hasBias ? 1 : 0);
        if (req.covariance) {
          // q/k/v (and gate/up) read the same input: compute its Σ a aᵀ once and emit it for each
          const key = `${m.input.name}:${m.hasBias}`;
          const seen = sharedA.get(key);
          if (seen) emit(seen, `A.${m.name}`);
          else {
            const am = g.mul(withOne(), g.unsqueeze(maskF, [1]));
            const A = g.node('Gemm', [am, withOne()], [{ dtype: g.float, shape: [dIn, dIn] }], { transA: 1 })[0];
            sharedA.set(key, A);
            emit(A, `A.${m.name}`);
          }
          const S = g.node('Gemm', [gy, gy], [{ dtype: g.float, shape: [m.dOut, m.dOut] }], { transA: 1 })[0];
          emit(S, `S.${m.name}`);
        }
        if (req.projected) {
          const PA = g.input(`PA.${m.name}`, g.float, [dIn, `kA_${m.name}`]);
          const PS = g.input(`PS.${m.name}`, g.float, [m.dOut, `kS_${m.name}`]);
          const ap = g.matmul(withOne(), PA); // [N, kA]
          const gp = g.matmul(gy, PS); // [N, kS]
          const kA = g.shapeOf(PA, 1, 2);
          const kS = g.shapeOf(PS, 1, 2);
          const ap3 = g.reshape(ap, g.concatInts([btShape, kA]), ['B', 'T', `kA_${m.name}`]);
          const gp3 = g.reshape(gp, g.concatInts([btShape, kS]), ['B', 'T', `kS_${m.name}`]);
          emit(g.matmul(g.transpose(gp3, [0, 2, 1]), ap3), `P.${m.name}`);
        }
        if (req.lowRank && (req.scores || req.tokenScores)) {
          const U = g.input(`U.${m.name}`, g.float, ['Q', m.dOut, `R_${m.name}`]);
          const V = g.input(`V.${m.name}`, g.float, ['Q', dIn, `R_${m.name}`]);
          const gU = g.matmul(g.unsqueeze(gy, [0]), U); // [Q, N, R]
          const aV = g.matmul(g.unsqueeze(withOne(), [0]), V); // [Q, N, R]
          const c = g.reduceSum(g.mul(gU, aV), [2], false); // [Q, N]
          if (req.tokenScores) tokenSum = accumulate(tokenSum, c);
          if (req.scores) {
            const c3 = g.reshape(c, g.concatInts([g.ints([-1]), btShape]), ['Q', 'B', 'T']);
            const sc = g.transpose(g.reduceSum(c3, [2], false), [1, 0]); // [B, Q]
            emit(sc, `score.${m.name}`);
            scoreSum = accumulate(scoreSum, sc);
          }
        }
        if (req.eigenbasis && (req.scores || req.tokenScores)) {
          const QA = g.input(`QA.${m.name}`, g.float, [dIn, dIn]);
          const QS = g.input(`QS.${m.name}`, g.float, [m.dOut, m.dOut]);
          const gr = g.matmul(gy, QS); // [N, dOut]: (Q_Sᵀ g_t)ᵀ
          const ar = g.matmul(withOne(), QA); // [N, dIn]: (Q_Aᵀ a_t)ᵀ
          // rows as rotated tokens (`eigenbasisTokens`): R_q = (RS_qᵀ RA_q) ⊙ IL is never formed
          // for more than row 0 (formed from graph inputs alone, ONNX Runtime kept every module's
          // alive at once: 5 GB more at the SmolLM-135M shape for 10 rows)
          const Tq = `Tq_${m.name}`;
          const tok = req.eigenbasisTokens
            ? {
                RS: g.input(`RS.${m.name}`, g.float, ['Q', Tq, m.dOut]),
                RA: g.input(`RA.${m.name}`, g.float, [Tq, dIn]),
                IL: g.input(`IL.${m.name}`, g.float, [m.dOut, dIn]),
              }
            : null;
          const R = tok ? null : g.input(`R.${m.name}`, g.float, ['Q', m.dOut, dIn]);
          if (req.tokenScores) {
            // c[0, t] = (Q_Sᵀ g_t)ᵀ R_0 (Q_Aᵀ a_t) = g_tᵀ P(G_0) a_t, for query row 0 only (the only
            // row whose token scores are read): a [Q, N, dIn] product would grow with the rows
            const row0 = (x: Tensor, d: number | string, e: number) =>
              g.node('Gather', [x, g.ints([0])], [{ dtype: g.float, shape: [1, d, e] }], { axis: 0 })[0];
            const R0 = tok
              ? g.mul(g.matmul(g.transpose(row0(tok.RS, Tq, m.dOut), [0, 2, 1]), tok.RA), tok.IL)
              : row0(R!, m.dOut, dIn); // [1, dOut, dIn]
            const gR = g.matmul(g.unsqueeze(gr, [0]), R0); // [1, N, dIn]
            tokenSum = accumulate(tokenSum, g.reduceSum(g.mul(gR, ar), [2], false));
          }
          if (req.scores) {
            const per = (x: Tensor, d: number) => g.reshape(x, g.concatInts([btShape, g.ints([d])]), ['B', 'T', d]);
            const rot = g.matmul(g.transpose(per(gr, m.dOut), [0, 2, 1]), per(ar, dIn)); // [B, dOut, dIn]
            let sc: Tensor;
            if (tok) {
              // ⟨R_q, rot_b⟩ = Σ_s Σ_o RS[q,s,o] Y_b[o,s], Y_b = (IL ⊙ rot_b) RAᵀ: B·dOut·dIn·Tq work
              const Y = g.matmul(g.mul(rot, tok.IL), g.transpose(tok.RA, [1, 0])); // [B, dOut, Tq]
              const Y2 = g.reshape(Y, [0, -1]); // [B, dOut·Tq]
              const RS2 = g.reshape(g.transpose(tok.RS, [0, 2, 1]), [0, -1]); // [Q, dOut·Tq]
              sc = g.node('Gemm', [Y2, RS2], [{ dtype: g.float, shape: ['B', 'Q'] }], { transB: 1 })[0];
            } else {
              const rot2 = g.reshape(rot, [-1, m.dOut * dIn]);
              const R2 = g.reshape(R!, [-1, m.dOut * dIn]);
              sc = g.node('Gemm', [rot2, R2], [{ dtype: g.float, shape: ['B', 'Q'] }], { transB: 1 })[0];
            }
            emit(sc, `score.${m.name}`);
            scoreSum = accumulate(scoreSum, sc);
          }
        }
        const M =
          !req.lowRank && !req.eigenbasis && (req.scores || req.tokenScores)
            ? g.input(`M.${m.name}`, g.float, ['Q', m.dOut, dIn])
            : null;
        if (M && req.tokenScores) {
          // c[q, t] = g_tᵀ M_q a_t : the training-side token heatmap, summed over modules
          const gM = g.matmul(g.unsqueeze(gy, [0]), M); // [Q, N, dIn]
          const c = g.reduceSum(g.mul(gM, withOne()), [2], false); // [Q, N]
          tokenSum = accumulate(tokenSum, c);
        }
        if (req.gradNorms && req.lowRank) {
          // ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s): T²·(dOut + dIn) work, the per-example G never formed
          const g3 = g.reshape(gy, g.concatInts([btShape, g.ints([m.dOut])]), ['B', 'T', m.dOut]);
          const a3 = g.reshape(withOne(), g.concatInts([btShape, g.ints([dIn])]), ['B', 'T', dIn]);
          const gg = g.matmul(g3, g.transpose(g3, [0, 2, 1])); // [B, T, T]
          const aa = g.matmul(a3, g.transpose(a3, [0, 2, 1])); // [B, T, T]
          normSum = accumulate(normSum, g.reduceSum(g.mul(gg, aa), [1, 2], false));
        }
        if (!needG) return;
        const perExample = (x: Tensor, d: number) => g.reshape(x, g.concatInts([btShape, g.ints([d])]), ['B', 'T', d]);
        // G_b = Σ_t g_t a_tᵀ, formed only for the outputs that need it
        const needFullG = req.exampleGrads || req.gradNorms || (M && req.scores);
        const G = needFullG
          ? g.matmul(g.transpose(perExample(gy, m.dOut), [0, 2, 1]), perExample(withOne(), dIn)) // [B, dOut, dIn]
          : null;
        if (G && req.exampleGrads) emit(G, `G.${m.name}`);
        if (req.lambda || req.selfInfluence) {
          // Q_Sᵀ G_b Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ: rotating the tokens first costs
          // T·(dOut² + dIn²) instead of dOut·dIn·(dOut + dIn) per sequence, less whenever T < d.
          const QA = g.input(`QA.${m.name}`, g.float, [dIn, dIn]);
          const QS = g.input(`QS.${m.name}`, g.float, [m.dOut, m.dOut]);
          const gr = perExample(g.matmul(gy, QS), m.dOut);
          const ar = perExample(g.matmul(withOne(), QA), dIn);
          const rot = g.matmul(g.transpose(gr, [0, 2, 1]), ar); // [B, dOut, dIn]
          // eigenvalue correction Λ: Σ_b (Q_Sᵀ G_b Q_A)², squared and summed by one op: a Mul then
          // a ReduceSum wrote and read back the [B, dOut, dIn] squares (10% of the Λ pass at Pythia-70M)
          if (req.lambda)
            emit(
              g.node('ReduceSumSquare', [rot, g.ints([0])], [{ dtype: g.float, shape: [m.dOut, dIn] }], {
                keepdims: 0,
              })[0],
              `L.${m.name}`,
            );
          const sq = req.selfInfluence ? g.mul(rot, rot) : null;
          if (sq) {
            // ⟨P(G_b), G_b⟩ = Σ (Q_Sᵀ G_b Q_A)² ⊘ (Λ + λ), with input `IL.<module>` = 1/(Λ + λ)
            const inv = g.input(`IL.${m.name}`, g.float, [m.dOut, dIn]);
            selfSum = accumulate(selfSum, g.reduceSum(g.mul(sq, inv), [1, 2], false));
          }
        }
        if (G && req.gradNorms && !req.lowRank) normSum = accumulate(normSum, g.reduceSum(g.mul(G, G), [1, 2], false));
        if (G && M && req.scores) {
          // ⟨M_q, G_b⟩ for every candidate b and query q
          const G2 = g.reshape(G, [-1, m.dOut * dIn]);
          const M2 = g.reshape(M, [-1, m.dOut * dIn]);
          const sc = g.node('Gemm', [G2, M2], [{ dtype: g.float, shape: ['B', 'Q'] }], { transB: 1 })[0];
          emit(sc, `score.${m.name}`);
          scoreSum = accumulate(scoreSum, sc);
        }
      });
    }
    if (req.covariance)
      emit(
        g.noGrad(() => g.reduceSum(maskF, [0], false)),
        'token_count',
      );
    if (scoreSum) emit(scoreSum, 'scores');
    if (selfSum) emit(selfSum, 'self_influence');
    if (normSum) emit(normSum, 'grad_sqnorm');
    if (tokenSum) {
      const ts = tokenSum as Tensor;
      emit(
        g.noGrad(() => g.reshape(ts, g.concatInts([g.ints([-1]), btShape]), ['Q', 'B', 'T'])),
        'token_scores',
      );
    }
  }
  if (req.paramGrads)
    for (const [name, t] of weights.tensors) {
      const gp = grads.get(t.name);
      emit(gp ?? g.noGrad(() => g.zerosLike(t)), `grad.${name}`);
    }
  return names;
}

/**
 * A run's outputs. Their memory is freed only when V8 collects them, which `CompiledGraph.run`
 * does before the next run once enough have piled up; a caller that loops over runs must not keep
 * a run's outputs in a variable of the loop: V8 keeps a suspended async function's loop variables
 * alive (a `const out` of one iteration survives the next iteration's `await`), so read them in a
 * function of their own, `read(await graph.run(batch))` (at 2,048 tokens of Pythia-70M, the fit's
 * covariance runs peaked 0.4 GB higher, one dead run's rows under each run).
 */
export type RunResult = Record<string, ort.Tensor>;

/** A compiled graph bound to an ORT session. */
export class CompiledGraph {
  constructor(
    readonly session: ort.InferenceSession,
    readonly outputNames: string[],
    readonly modules: TrackedModule[],
    /** parameter names to feed, when weights are graph inputs */
    readonly paramInputs: Array<{ name: string; shape: number[] }> | null,
    readonly fp64 = false,
    /** for a session with ONNX Runtime's arena: the same graph without one, for runs of a long sequence (`Batch.alone`) */
    readonly leanSession: (() => Promise<ort.InferenceSession>) | null = null,
    /**
     * output names that read another output's tensor (`a.<k_proj>` → `a.<q_proj>`: modules that
     * read one input): fetched once, returned under every name asked for, the same tensor
     */
    readonly aliases: ReadonlyMap<string, string> = new Map(),
  ) {}

  get moduleInfo(): ModuleInfo[] {
    return this.modules.map(moduleInfoOf);
  }

  /** A float tensor in this graph's precision (converting only when the array's type differs). */
  tensor(v: Float32Array | Float64Array, shape: number[]): ort.Tensor {
    return floatTensor(this.fp64, v, shape);
  }

  async run(
    batch: Batch,
    extra: {
      uniforms?: Float32Array;
      params?: Map<string, Float32Array | Float64Array>;
      /** extra graph inputs by name: `M.<module>`, `QA.<module>`, `QS.<module>` */
      feeds?: Record<string, ort.Tensor>;
      outputs?: string[];
    } = {},
  ): Promise<RunResult> {
    const dims = [batch.B, batch.T];
    const float = (v: Float32Array | Float64Array, shape: number[]) => this.tensor(v, shape);
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', batch.inputIds, dims),
      attention_mask: new ort.Tensor('int64', batch.attentionMask, dims),
      target_weights: float(batch.targetWeights, dims),
    };
    const inputs = new Set(this.session.inputNames);
    if (inputs.has('target_ids')) feeds.target_ids = new ort.Tensor('int64', batch.targetIds, dims);
    if (inputs.has('sample_uniform')) {
      if (!extra.uniforms) throw new EngineError('this graph samples labels: pass `uniforms` (B·T numbers in [0,1))');
      feeds.sample_uniform = float(extra.uniforms, dims);
    }
    if (this.paramInputs) {
      if (!extra.params) throw new EngineError('this graph takes the weights as inputs: pass `params`');
      for (const { name, shape } of this.paramInputs) {
        const v = extra.params.get(name);
        if (!v) throw new EngineError(`missing parameter ${name}`);
        if (inputs.has(`p:${name}`)) feeds[`p:${name}`] = float(v, shape);
      }
    }
    for (const [k, t] of Object.entries(extra.feeds ?? {})) {
      if (!inputs.has(k)) throw new EngineError(`this graph has no input "${k}"`);
      feeds[k] = t;
    }
    for (const k of inputs) if (!(k in feeds)) throw new EngineError(`missing graph input "${k}"`);
    // The last runs' outputs are garbage by now (every caller reduces or copies them before its next
    // run), but V8 does not count them against its heap: at Qwen2.5-0.5B a Λ run returns 1.6 GB of
    // sums, and without a collection between runs several runs' worth stacked up under the next.
    // After an await: while the caller's frame is on the stack V8 treats all its registers as roots,
    // stale ones included (the last run's outputs); once it is suspended, only its live variables.
    await null;
    collectWhenPiledUp(OUTPUT_GARBAGE_BYTES);
    const session = batch.alone && this.leanSession ? await this.leanSession() : this.session;
    const mapped = !!batch.overBudget && mapLargeBlocks(true);
    try {
      const wanted = extra.outputs ?? this.outputNames;
      const fetch = [...new Set(wanted.map((n) => this.aliases.get(n) ?? n))];
      const out = await session.run(feeds, fetch);
      let bytes = 0;
      for (const t of Object.values(out)) bytes += (t.data as ArrayBufferView).byteLength ?? 0;
      noteDroppedSoon(bytes);
      if (!this.aliases.size) return out;
      const result: RunResult = { ...out };
      for (const n of wanted) {
        const to = this.aliases.get(n);
        if (to !== undefined) result[n] = out[to];
      }
      return result;
    } finally {
      if (mapped) mapLargeBlocks(false);
      releaseFreedMemory();
    }
  }
}
