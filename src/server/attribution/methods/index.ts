// The scorer of every method in the registry (src/protocol/methods.ts), by id. The type makes a
// registry id without a scorer a compile error; test/unit/method-scorers.test.ts checks it too.
import type { Method } from '../../../protocol/methods';
import { bm25 } from './bm25';
import { cosine } from './cosine';
import { ekfac } from './ekfac';
import { gdp } from './gdp';
import { multistage } from './multistage';
import { repsim } from './repsim';
import type { Scorer } from './scorer';

export const SCORERS: Readonly<Record<Method, Scorer>> = { ekfac, multistage, gdp, cosine, repsim, bm25 };

export type { GradientScorer, PoolContext, PoolScorer, Scorer } from './scorer';
