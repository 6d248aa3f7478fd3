// Package settings declares configuration once: each setting has its environment variable,
// its command-line flag (if any), its default and its parser in one place, so that a program's
// parser, its usage text and the README's tables are all derived from (or checked against) the
// same declaration.
//
// A value comes from the flag when given, else from the environment variable when it is
// non-empty, else from the default. Every bad value is reported, naming where it came from;
// nothing falls back silently.
package settings

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Setting is one declared configuration value.
type Setting struct {
	Env     string // environment variable
	Flag    string // flag name without dashes; "" for environment-only settings
	Default string // the default as a user would write it; "" means unset
	Usage   string

	parse  func(string) error
	isBool bool
}

// Set is an ordered collection of settings.
type Set struct {
	list []*Setting
}

// Settings returns the declarations in order.
func (s *Set) Settings() []*Setting { return s.list }

// Lookup returns the setting with that environment variable, or nil.
func (s *Set) Lookup(env string) *Setting {
	for _, st := range s.list {
		if st.Env == env {
			return st
		}
	}
	return nil
}

// Func declares a setting with its own parser. parse is called once with the chosen value;
// with no value and an empty default it is not called.
func (s *Set) Func(env, flagName, def, usage string, parse func(string) error) *Setting {
	st := &Setting{Env: env, Flag: flagName, Default: def, Usage: usage, parse: parse}
	s.list = append(s.list, st)
	return st
}

// String declares a string setting.
func (s *Set) String(dst *string, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error { *dst = v; return nil })
}

// Port declares a TCP port (1-65535).
func (s *Set) Port(dst *uint16, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		p, err := ParsePort(v)
		*dst = p
		return err
	})
}

// Addr declares an IP address (kept as text, ready for net.JoinHostPort).
func (s *Set) Addr(dst *string, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		if _, err := netip.ParseAddr(v); err != nil {
			return errors.New("want an IP address")
		}
		*dst = v
		return nil
	})
}

// Duration declares a positive Go duration (30s, 500ms).
func (s *Set) Duration(dst *time.Duration, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return errors.New("want a positive duration such as 30s")
		}
		*dst = d
		return nil
	})
}

// PositiveInt declares an integer greater than zero.
func (s *Set) PositiveInt(dst *int, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return errors.New("want a positive integer")
		}
		*dst = n
		return nil
	})
}

// Uint32 declares an unsigned 32-bit number (a UID or GID).
func (s *Set) Uint32(dst *uint32, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return errors.New("want a number")
		}
		*dst = uint32(n)
		return nil
	})
}

// Bool declares a boolean (1, true, 0, false, ...). As a flag it needs no value.
func (s *Set) Bool(dst *bool, env, flagName, def, usage string) *Setting {
	st := s.Func(env, flagName, def, usage, func(v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return errors.New("want true or false")
		}
		*dst = b
		return nil
	})
	st.isBool = true
	return st
}

// OneOf declares a string restricted to choices.
func (s *Set) OneOf(dst *string, choices []string, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		for _, c := range choices {
			if v == c {
				*dst = v
				return nil
			}
		}
		return fmt.Errorf("want one of %s", strings.Join(choices, ", "))
	})
}

// Ports declares a comma-separated list of ports.
func (s *Set) Ports(dst *[]uint16, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		var out []uint16
		for _, f := range SplitList(v) {
			p, err := ParsePort(f)
			if err != nil {
				return fmt.Errorf("%q: %v", f, err)
			}
			out = append(out, p)
		}
		*dst = out
		return nil
	})
}

// Prefixes declares a comma-separated list of CIDRs. Host bits must be zero: 10.0.0.1/8 is
// more likely a typo than a wish for 10.0.0.0/8.
func (s *Set) Prefixes(dst *[]netip.Prefix, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		var out []netip.Prefix
		for _, f := range SplitList(v) {
			p, err := netip.ParsePrefix(f)
			if err != nil || p != p.Masked() {
				return fmt.Errorf("%q: want a masked CIDR such as 203.0.113.0/24", f)
			}
			out = append(out, p)
		}
		*dst = out
		return nil
	})
}

// Addrs declares a comma-separated list of IP addresses.
func (s *Set) Addrs(dst *[]netip.Addr, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		var out []netip.Addr
		for _, f := range SplitList(v) {
			a, err := netip.ParseAddr(f)
			if err != nil || a.Zone() != "" {
				return fmt.Errorf("%q: want an IP address", f)
			}
			out = append(out, a.Unmap())
		}
		*dst = out
		return nil
	})
}

// ParseSecondsOrDuration reads a whole number of seconds (the original egress-guard's
// WATCH_INTERVAL) or a positive Go duration such as 500ms.
func ParseSecondsOrDuration(v string) (time.Duration, error) {
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return time.Duration(n) * time.Second, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return d, nil
	}
	return 0, errors.New("want seconds (5) or a duration (500ms)")
}

// LogLevel declares a log level setting (DEBUG, INFO, WARN, ERROR).
func (s *Set) LogLevel(dst *slog.Level, env, flagName, def string) *Setting {
	return s.Func(env, flagName, def, "DEBUG, INFO, WARN or ERROR", func(v string) error {
		if err := dst.UnmarshalText([]byte(v)); err != nil {
			return errors.New("want DEBUG, INFO, WARN or ERROR")
		}
		return nil
	})
}

// SecondsOrDuration declares an interval written as whole seconds (the original egress-guard's
// WATCH_INTERVAL) or a Go duration.
func (s *Set) SecondsOrDuration(dst *time.Duration, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		d, err := ParseSecondsOrDuration(v)
		*dst = d
		return err
	})
}

// ListOrNone declares a comma-separated list whose empty value is spelled "none" (an unset
// variable means the default).
func (s *Set) ListOrNone(dst *[]string, env, flagName, def, usage string) *Setting {
	return s.Func(env, flagName, def, usage, func(v string) error {
		*dst = nil
		if v != "none" {
			*dst = SplitList(v)
		}
		return nil
	})
}

// ParsePort parses a TCP port number 1-65535.
func ParsePort(v string) (uint16, error) {
	p, err := strconv.ParseUint(v, 10, 16)
	if err != nil || p == 0 {
		return 0, errors.New("want a port number 1-65535")
	}
	return uint16(p), nil
}

// SplitList splits a comma-separated list, dropping blanks.
func SplitList(v string) []string {
	var out []string
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// flagValue records a flag's raw text; parsing happens in Load with the other sources.
type flagValue struct {
	st    *Setting
	value string
	set   bool
}

func (f *flagValue) String() string { return f.value }
func (f *flagValue) Set(v string) error {
	f.value, f.set = v, true
	return nil
}
func (f *flagValue) IsBoolFlag() bool { return f.st.isBool }

// Load parses args (flags only; positional arguments are an error) and the environment
// through getenv, and applies every setting. It returns every problem at once.
func (s *Set) Load(name string, args []string, getenv func(string) string) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	flags := make(map[*Setting]*flagValue)
	for _, st := range s.list {
		if st.Flag != "" {
			fv := &flagValue{st: st}
			flags[st] = fv
			fs.Var(fv, st.Flag, st.Usage)
		}
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var errs []string
	for _, st := range s.list {
		v, from := st.Default, "default"
		if fv := flags[st]; fv != nil && fv.set {
			v, from = fv.value, "--"+st.Flag
		} else if e := getenv(st.Env); e != "" {
			v, from = e, st.Env
		}
		if v == "" && from == "default" {
			continue
		}
		if err := st.parse(v); err != nil {
			errs = append(errs, fmt.Sprintf("%s=%q: %v", from, v, err))
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// PrintUsage writes one line per setting: flag, environment variable, default, usage.
func (s *Set) PrintUsage(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "flag\tenvironment\tdefault\tmeaning")
	for _, st := range s.list {
		f := "-"
		if st.Flag != "" {
			f = "--" + st.Flag
		}
		d := st.Default
		if d == "" {
			d = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f, st.Env, d, st.Usage)
	}
	tw.Flush()
}

// CheckDocumented reports the settings that a Markdown document does not describe: each must
// appear in a table row that names its environment variable in backquotes and, when it has a
// default, shows that default in backquotes too. It keeps README tables honest.
func (s *Set) CheckDocumented(markdown string) error {
	var rows []string
	for _, l := range strings.Split(markdown, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "|") {
			rows = append(rows, l)
		}
	}
	var missing []string
	for _, st := range s.list {
		found := false
		for _, r := range rows {
			if strings.Contains(r, "`"+st.Env+"`") && (st.Default == "" || strings.Contains(r, "`"+st.Default+"`")) {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, fmt.Sprintf("%s (default %q)", st.Env, st.Default))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("not documented in a table row with its default: %s", strings.Join(missing, ", "))
	}
	return nil
}
