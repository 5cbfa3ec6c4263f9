// Picks the client: the test fixture when the e2e harness names one in the environment,
// otherwise the server connection (not plugged in yet: `UnconnectedClient`).
import { FIXTURE_ENV, FixtureClient } from './fixture-client';
import type { InfluenceClient } from './influence-client';
import { UnconnectedClient } from './unconnected-client';

export function createClient(env: NodeJS.ProcessEnv = process.env): InfluenceClient {
  const fixture = env[FIXTURE_ENV];
  if (fixture) return new FixtureClient(fixture);
  return new UnconnectedClient();
}

export * from './influence-client';
