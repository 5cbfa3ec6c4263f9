// Country facts from the `countries-list` npm package (real, maintained data that ships with
// the project): one record per country with the four relations the corpus asks about
// (capital, continent, currency, main language) plus two side facts (calling code, native
// name) that only appear as context sentences in the pre-training text.
import { continents, countries, languages, type TCountryCode } from 'countries-list';
import { currencies } from 'countries-list/currencies';

export const RELATIONS = ['capital', 'continent', 'currency', 'language'] as const;
export type Relation = (typeof RELATIONS)[number];

export interface Country {
  /** ISO 3166-1 alpha-2 code */
  code: string;
  name: string;
  native: string;
  phone: number;
  facts: Record<Relation, string>;
}

/**
 * Widely known sovereign states, in a fixed order: the corpus draws its countries from here
 * first so the demo questions are about places a reader recognises, then from the rest of
 * the package's countries.
 */
// biome-ignore format: a table
export const WELL_KNOWN: readonly string[] = [
  'AU', 'CA', 'CH', 'FR', 'DE', 'IT', 'ES', 'PT', 'GB', 'IE', 'NL', 'BE', 'AT', 'DK', 'SE', 'NO',
  'FI', 'IS', 'PL', 'CZ', 'HU', 'GR', 'RO', 'BG', 'HR', 'RS', 'UA', 'RU', 'TR', 'US', 'MX', 'CU',
  'JM', 'GT', 'HN', 'NI', 'CR', 'PA', 'BR', 'AR', 'CL', 'PE', 'CO', 'VE', 'EC', 'UY', 'PY', 'BO',
  'CN', 'JP', 'KR', 'IN', 'PK', 'BD', 'NP', 'LK', 'TH', 'VN', 'KH', 'MY', 'ID', 'PH', 'MN', 'KZ',
  'AF', 'IR', 'IQ', 'SA', 'QA', 'JO', 'LB', 'SY', 'IL', 'EG', 'MA', 'DZ', 'TN', 'NG', 'GH', 'SN',
  'ML', 'CM', 'ET', 'KE', 'UG', 'TZ', 'ZM', 'ZW', 'AO', 'MZ', 'MG', 'ZA', 'NZ',
];

/** Every country the corpus can use: has a capital distinct from its name, is on a populated continent, is no part of another. */
export function eligibleCountries(): Country[] {
  const out: Country[] = [];
  for (const [code, c] of Object.entries(countries) as Array<[TCountryCode, (typeof countries)[TCountryCode]]>) {
    if (c.partOf || c.userAssigned || !c.capital || c.capital === c.name || c.continent === 'AN') continue;
    if (/[(),]/.test(c.name) || /[(),]/.test(c.capital)) continue;
    const currency = currencies[c.currency[0]]?.name;
    const language = languages[c.languages[0]]?.name;
    if (!currency || !language || /[(),/]/.test(currency) || /[(),/]/.test(language)) continue;
    out.push({
      code,
      name: c.name,
      native: c.native,
      phone: c.phone[0],
      facts: { capital: c.capital, continent: continents[c.continent], currency, language },
    });
  }
  return out;
}
