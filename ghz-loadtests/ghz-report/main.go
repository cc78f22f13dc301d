// Command ghz-report renders ghz's own HTML report from the JSON report ghz wrote.
//
// ghz writes one output format per run; the load-test runner (tools/loadtest.py) asks for JSON,
// which it reads, and uses this to produce the HTML page too, with ghz's own printer, instead of
// running every scenario twice.
//
// Usage: ghz-report <report.json> <report.html>
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/bojand/ghz/printer"
	"github.com/bojand/ghz/runner"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: ghz-report <report.json> <report.html>")
		os.Exit(2)
	}
	if err := convert(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "ghz-report:", err)
		os.Exit(1)
	}
}

func convert(jsonPath, htmlPath string) error {
	raw, err := os.ReadFile(jsonPath)
	if err != nil {
		return err
	}
	var report runner.Report
	if err := json.Unmarshal(raw, &report); err != nil {
		return fmt.Errorf("%s is not a ghz JSON report: %w", jsonPath, err)
	}
	out, err := os.Create(htmlPath)
	if err != nil {
		return err
	}
	p := printer.ReportPrinter{Out: out, Report: &report}
	if err := p.Print("html"); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
