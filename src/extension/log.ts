// The "Influence Lens" output channel (View → Output), for what a person may need to report a bug.
import * as vscode from 'vscode';

export const log = vscode.window.createOutputChannel('Influence Lens', { log: true });
